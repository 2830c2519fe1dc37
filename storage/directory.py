"""Directory rows (applications, resources, authority records): ours to keep (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rules.timefmt import iso_ms
from storage.db import Conn, one, q1


async def ensure_zone(conn: Conn, zone_id: str) -> None:
    await conn.execute("INSERT INTO zones (id) VALUES (%s) ON CONFLICT DO NOTHING", (zone_id,))


def application_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "registration_method": row["registration_method"],
            "expires_at": iso_ms(row["expires_at"]), "archived_at": iso_ms(row["archived_at"]),
            "created_at": iso_ms(row["created_at"]), "updated_at": iso_ms(row["updated_at"])}


def resource_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "identifier": row["identifier"],
            "scopes": list(row["scopes"]), "archived_at": iso_ms(row["archived_at"]),
            "created_at": iso_ms(row["created_at"]), "updated_at": iso_ms(row["updated_at"])}


def authority_record_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "session_type": row["session_type"],
            "subject_id": row["subject_id"], "status": row["status"], "expires_at": iso_ms(row["expires_at"]),
            "created_at": iso_ms(row["created_at"]), "revoked_at": iso_ms(row["revoked_at"]),
            "revoked_reason": row["revoked_reason"]}


async def put_application(conn: Conn, zone_id: str, app_id: str, registration_method: str,
                          expires_at: datetime | None) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO applications (zone_id, id, registration_method, expires_at) VALUES (%s, %s, %s, %s)
        ON CONFLICT (zone_id, id) DO UPDATE SET registration_method = EXCLUDED.registration_method,
            expires_at = EXCLUDED.expires_at, archived_at = NULL, updated_at = now()
        RETURNING *""", (zone_id, app_id, registration_method, expires_at)))


async def put_resource(conn: Conn, zone_id: str, resource_id: str, identifier: str,
                       scopes: list[str]) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO resources (zone_id, id, identifier, scopes) VALUES (%s, %s, %s, %s)
        ON CONFLICT (zone_id, id) DO UPDATE SET identifier = EXCLUDED.identifier, scopes = EXCLUDED.scopes,
            archived_at = NULL, updated_at = now()
        RETURNING *""", (zone_id, resource_id, identifier, scopes)))


async def put_authority_record(conn: Conn, zone_id: str, record_id: str, session_type: str, subject_id: str,
                               expires_at: datetime) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO authority_records (zone_id, id, session_type, subject_id, expires_at, authenticated_at)
        VALUES (%s, %s, %s, %s, %s, now())
        ON CONFLICT (zone_id, id) DO UPDATE SET session_type = EXCLUDED.session_type,
            subject_id = EXCLUDED.subject_id, expires_at = EXCLUDED.expires_at, status = 'active',
            revoked_at = NULL, revoked_reason = NULL
        RETURNING *""", (zone_id, record_id, session_type, subject_id, expires_at)))
