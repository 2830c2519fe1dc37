"""Service-agent commands (reference §4.11-4.13): register a service, heartbeat a service session's
lease, take the lease over. A heartbeat or takeover that finds the lease already lapsed settles it
(subtree suspended) in its own transaction and is refused: a lapsed lease is never revived."""

from __future__ import annotations

from typing import Any, NoReturn

from commands.sessions import locked_managed_session
from rules import authz
from rules.errors import CoordinatorError
from rules.identity import Identity
from rules.timefmt import iso_ms
from settings import Settings
from storage import services as store
from storage import sessions as session_store
from storage.db import BeforeCommit, Conn, Database


async def register(db: Database, ident: Identity, zone_id: str, service: dict[str, Any],
                   before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    if not authz.can_register_service(ident, service["application_id"]):
        raise CoordinatorError(403, "application_ownership_required")
    row = await db.run(lambda conn: store.upsert_service(conn, zone_id, service), before_commit=before_commit)
    return store.service_projection(row)


async def heartbeat(db: Database, settings: Settings, ident: Identity, zone_id: str, session_id: str, *,
                    service_id: str | None, status: str, metadata: dict[str, Any], lease_generation: int | None,
                    before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    async def beat(conn: Conn) -> dict[str, Any]:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        return await store.heartbeat(conn, settings, zone_id, row, service_id=service_id, status=status,
                                     metadata=metadata, lease_generation=lease_generation)
    try:
        return await db.run(beat, before_commit=before_commit)
    except store.LeaseExpired:
        await _settle_lapsed_lease(db, zone_id, session_id)


async def take_lease(db: Database, settings: Settings, ident: Identity, zone_id: str, session_id: str,
                     before_commit: BeforeCommit[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    async def take(conn: Conn) -> dict[str, Any] | None:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        if row["status"] == "active" and row["lifecycle"] == "service" and await store.lease_lapsed(conn, session_id):
            return None  # settled below, in its own transaction
        taken = await session_store.take_lease(conn, settings, zone_id, row)
        return {"agent_session_id": session_id, "status": taken["status"],
                "heartbeat_deadline_at": iso_ms(taken["heartbeat_deadline_at"]),
                "lease_generation": taken["lease_generation"]}
    answer = await db.run(take, before_commit=before_commit)
    if answer is None:
        await _settle_lapsed_lease(db, zone_id, session_id)
    return answer


async def _settle_lapsed_lease(db: Database, zone_id: str, session_id: str) -> NoReturn:
    """Settle the lapsed lease now (the workflow's timer may not have fired yet), then refuse."""
    await db.run(lambda conn: session_store.settle_deadline(conn, zone_id, session_id))
    raise CoordinatorError(409, "session_lease_expired")
