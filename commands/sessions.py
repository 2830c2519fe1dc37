"""Session commands (reference §4.4-4.10): start, suspend, resume, terminate; one transaction each.
The workflows hear of each through the workflow outbox, written in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rules import authz, lifecycle
from rules.errors import CoordinatorError
from rules.idempotency import request_digest
from rules.identity import Identity
from rules.ids import new_id
from rules.sessions import resolve_ttl
from settings import Settings
from storage import sessions as store
from storage.db import BeforeCommit, Conn, Database
from storage.idempotency import SESSION_START, CreateResult, IdempotencyRequest


async def locked_managed_session(conn: Conn, ident: Identity, zone_id: str, session_id: str) -> dict[str, Any]:
    """The session row, locked for the command's transaction: 404 when absent, 403 when not the caller's."""
    row = await store.get_session(conn, zone_id, session_id, lock=True)
    if row is None:
        raise CoordinatorError(404, "session_not_found")
    if not authz.can_manage_session(ident, row["application_id"]):
        raise CoordinatorError(403, "application_ownership_required")
    return row


@dataclass(frozen=True)
class StartSessionRequest:
    application_id: str
    subject_session_id: str | None
    parent_id: str | None
    lifecycle: str
    labels: list[str]
    ttl_seconds: int | None
    parent_authority: str
    inherit_parent_edge_id: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    generated: bool = False  # `Idempotency-Key-Kind: generated`: kept 24 h instead of 7 days


async def start(db: Database, settings: Settings, ident: Identity, zone_id: str, req: StartSessionRequest,
                idempotency_key: IdempotencyKey | None,
                before_commit: BeforeCommit[CreateResult] | None = None) -> CreateResult:
    """Steps 1-4 here (subject record, ownership, ttl, idempotency), 5-15 in storage's transaction."""
    record_id = req.subject_session_id or ident.authority_record_id
    if not record_id:
        raise CoordinatorError(400, "subject_session_id_required")
    if not authz.can_start_for(ident, req.application_id):
        raise CoordinatorError(403, "application_ownership_required")
    ttl = resolve_ttl(req.lifecycle, req.ttl_seconds)
    idem = None
    if idempotency_key is not None:
        digest = request_digest({
            "principal": {"client_id": ident.client_id, "subject": ident.subject},
            "application_id": req.application_id, "subject_authority_record_id": record_id,
            "parent_id": req.parent_id, "lifecycle": req.lifecycle, "labels": req.labels, "ttl_seconds": ttl,
            "parent_authority": req.parent_authority, "inherit_parent_edge_id": req.inherit_parent_edge_id,
            "metadata": req.metadata})
        idem = IdempotencyRequest(SESSION_START, zone_id, req.application_id, idempotency_key.key, digest,
                                  idempotency_key.generated)
    cmd = store.StartSession(
        zone_id=zone_id, session_id=new_id(), application_id=req.application_id, authority_record_id=record_id,
        parent_id=req.parent_id, lifecycle=req.lifecycle, labels=req.labels, ttl_seconds=ttl,
        parent_authority=req.parent_authority, inherit_parent_edge_id=req.inherit_parent_edge_id,
        metadata=req.metadata, may_spawn_under=lambda parent_app: authz.can_spawn_under(ident, parent_app))
    return await store.start(db, settings, cmd, idem, before_commit=before_commit)


async def suspend(db: Database, ident: Identity, zone_id: str, session_id: str,
                  before_commit: BeforeCommit[dict[str, int]] | None = None) -> dict[str, int]:
    async def suspend_session(conn: Conn) -> dict[str, int]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        suspended = await store.suspend_subtree(conn, zone_id, [session_id], "requested")
        if not suspended:
            raise CoordinatorError(409, "session_not_found_or_not_active")
        return {"suspended": suspended}
    return await db.run(suspend_session, before_commit=before_commit)


async def resume(db: Database, settings: Settings, ident: Identity, zone_id: str, session_id: str,
                 before_commit: BeforeCommit[dict[str, int]] | None = None) -> dict[str, int]:
    async def resume_session(conn: Conn) -> dict[str, int]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        resumed = await store.resume_subtree(conn, settings, zone_id, session_id)
        if not resumed:
            raise CoordinatorError(409, "session_not_found_or_not_suspended")
        return {"resumed": resumed}
    return await db.run(resume_session, before_commit=before_commit)


async def terminate(db: Database, ident: Identity, zone_id: str, session_id: str, reason: str,
                    lease_generation: int | None, before_commit: BeforeCommit[None] | None = None) -> None:
    """A service session is fenced by its lease generation (required unless coordinator.admin)."""
    async def terminate_session(conn: Conn) -> None:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        if row["status"] not in lifecycle.SESSION_LIVE:
            raise CoordinatorError(404, "session_not_found")
        if row["lifecycle"] == "service":
            if lease_generation is None and not authz.is_admin(ident):
                raise CoordinatorError(400, "lease_generation_required")
            if lease_generation is not None and lease_generation != row["lease_generation"]:
                raise CoordinatorError(409, "session_lease_fenced")
        await store.terminate_subtree(conn, zone_id, [session_id], reason)
    await db.run(terminate_session, before_commit=before_commit)
