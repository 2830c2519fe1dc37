"""Agent services and service-session heartbeats (reference §4.11-4.13, sdk-wire-contract §4.5)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from rules import lifecycle
from rules.errors import CoordinatorError
from rules.ids import new_id
from rules.timefmt import iso_ms
from settings import Settings
from storage.db import Conn, Database, one, q1
from storage.pages import Page, list_page

SERVICE_COLUMNS = """x.id, x.zone_id, x.application_id, x.endpoint_url, x.protocol_versions, x.framework_name,
    x.framework_version, x.capabilities, x.health, x.metadata_json, x.last_heartbeat_at"""


def service_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "application_id": row["application_id"],
            "endpoint_url": row["endpoint_url"], "protocol_versions": list(row["protocol_versions"]),
            "framework_name": row["framework_name"], "framework_version": row["framework_version"],
            "capabilities": list(row["capabilities"]), "health": row["health"],
            "metadata_json": row["metadata_json"], "last_heartbeat_at": iso_ms(row["last_heartbeat_at"])}


async def list_services(db: Database, zone_id: str, limit: int, cursor: str | None) -> Page:
    return await list_page(db, table="agent_services", zone_id=zone_id, limit=limit, cursor=cursor,
                           sql=f"SELECT {SERVICE_COLUMNS} FROM agent_services x WHERE x.zone_id = %s",
                           params=[zone_id], project=service_projection)


async def upsert_service(conn: Conn, zone_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Insert or update on (zone, application, endpoint_url); health, heartbeat time and id preserved."""
    app = await q1(conn, """SELECT 1 FROM applications WHERE zone_id = %s AND id = %s AND archived_at IS NULL
                            AND (expires_at IS NULL OR expires_at > now()) FOR SHARE""",
                   (zone_id, body["application_id"]))
    if app is None:
        raise CoordinatorError(404, "application_not_found")
    framework = body.get("framework") or {}
    return one(await q1(conn, f"""
        INSERT INTO agent_services AS x (id, zone_id, application_id, endpoint_url, protocol_versions, framework_name,
            framework_version, capabilities, metadata_json, last_heartbeat_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now())
        ON CONFLICT (zone_id, application_id, endpoint_url) DO UPDATE SET
            protocol_versions = EXCLUDED.protocol_versions, framework_name = EXCLUDED.framework_name,
            framework_version = EXCLUDED.framework_version, capabilities = EXCLUDED.capabilities,
            metadata_json = EXCLUDED.metadata_json, updated_at = now()
        RETURNING {SERVICE_COLUMNS}""",
                    (new_id(), zone_id, body["application_id"], body["endpoint_url"], body["protocol_versions"],
                     framework.get("name"), framework.get("version"), body["capabilities"], Jsonb(body["metadata"]))))


class LeaseExpired(Exception):
    """The lease lapsed before this heartbeat: it must be settled (storage.sessions.settle_deadline)."""


async def lease_lapsed(conn: Conn, session_id: str) -> bool:
    row = await q1(conn, "SELECT status = 'active' AND heartbeat_deadline_at <= now() AS lapsed FROM sessions "
                         "WHERE id = %s", (session_id,))
    return bool(row and row["lapsed"])


async def heartbeat(conn: Conn, settings: Settings, zone_id: str, session: dict[str, Any], *, service_id: str | None,
                    status: str, metadata: dict[str, Any], lease_generation: int | None) -> dict[str, Any]:
    """Refresh the lease row (fenced on lease_generation); the caller holds the row lock."""
    if session["status"] not in lifecycle.SESSION_LIVE:
        raise CoordinatorError(409, "session_not_live")
    if session["lifecycle"] != "service":
        raise CoordinatorError(409, "session_not_service")
    if lease_generation is not None and lease_generation != session["lease_generation"]:
        raise CoordinatorError(409, "session_lease_fenced")
    # One round trip: the row is locked by the caller, so the only way the guarded UPDATE matches
    # nothing is an active lease whose deadline has passed (same transaction `now()` throughout).
    agent = await q1(conn, """
        UPDATE sessions SET last_active_at = now(), last_heartbeat_at = now(),
            heartbeat_deadline_at = now() + make_interval(secs => %s)
        WHERE id = %s AND NOT (status = 'active' AND COALESCE(heartbeat_deadline_at <= now(), false))
        RETURNING id, zone_id, application_id, status, last_active_at, last_heartbeat_at, heartbeat_deadline_at,
                  lease_generation""", (settings.SERVICE_AGENT_LEASE_SECONDS, session["id"]))
    if agent is None:
        raise LeaseExpired()
    service = None
    if service_id is not None:
        service = await q1(conn, f"""
            UPDATE agent_services x SET health = %s, metadata_json = x.metadata_json || %s, last_heartbeat_at = now(),
                updated_at = now()
            WHERE x.zone_id = %s AND x.id = %s AND x.application_id = %s
            RETURNING {SERVICE_COLUMNS}""", (status, Jsonb(metadata), zone_id, service_id, session["application_id"]))
        if service is None:
            raise CoordinatorError(404, "agent_service_not_found")
    return {
        "agent": {"id": agent["id"], "agent_session_id": agent["id"], "zone_id": agent["zone_id"],
                  "application_id": agent["application_id"], "status": agent["status"],
                  "last_active_at": iso_ms(agent["last_active_at"]),
                  "last_heartbeat_at": iso_ms(agent["last_heartbeat_at"]),
                  "heartbeat_deadline_at": iso_ms(agent["heartbeat_deadline_at"]),
                  "lease_generation": agent["lease_generation"]},
        "service": service_projection(service) if service else None,
    }
