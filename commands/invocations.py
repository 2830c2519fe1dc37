"""Invocation commands (reference §4.13-4.17): create, start, cancel, complete; one transaction each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rules import authz
from rules.errors import CoordinatorError
from rules.idempotency import request_digest
from rules.identity import Identity
from rules.ids import new_id
from settings import Settings
from storage import invocations as store
from storage.db import BeforeCommit, Conn, Database
from storage.idempotency import INVOCATION_CREATE, CreateResult, IdempotencyRequest

# Charges the caller's invocation rate (the API's limiter); raises 429 when over it.
ChargeRate = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class CreateInvocationRequest:
    service_id: str
    source_session_id: str | None
    target_session_id: str | None
    method: str
    params: Any
    metadata: dict[str, Any]
    timeout_ms: int
    retry_policy: dict[str, Any]


async def create(db: Database, settings: Settings, ident: Identity, zone_id: str, req: CreateInvocationRequest,
                 idempotency_key: str, charge_rate: ChargeRate,
                 before_commit: BeforeCommit[CreateResult] | None = None) -> CreateResult:
    """Checks the service and sessions, the caller's ownership of the source, then answers a repeat
    from its receipt (not rate limited) or charges the rate and creates."""
    digest = request_digest({
        "principal": {"client_id": ident.client_id, "subject": ident.subject}, "service_id": req.service_id,
        "source_session_id": req.source_session_id, "target_session_id": req.target_session_id,
        "method": req.method, "params": req.params, "metadata": req.metadata, "timeout_ms": req.timeout_ms,
        "retry_policy": req.retry_policy})

    async def create_invocation(conn: Conn) -> CreateResult:
        source_app = await store.check_create(conn, zone_id, req.service_id,
                                              [req.source_session_id, req.target_session_id])
        if not authz.can_invoke(ident, source_app):
            raise CoordinatorError(403, "invoker_ownership_required")
        idem = IdempotencyRequest(INVOCATION_CREATE, zone_id, source_app, idempotency_key, digest)
        replay = await store.replay(conn, settings, idem)
        if replay is not None:
            return replay
        await charge_rate()
        cmd = store.CreateInvocation(
            zone_id=zone_id, invocation_id=new_id(), service_id=req.service_id,
            source_session_id=req.source_session_id, target_session_id=req.target_session_id, method=req.method,
            params=req.params, metadata=req.metadata, timeout_ms=req.timeout_ms, retry_policy=req.retry_policy,
            scope_id=source_app)
        return await store.create(conn, settings, cmd, idem)
    return await db.run(create_invocation, before_commit=before_commit)


async def _transition(db: Database, ident: Identity, zone_id: str, invocation_id: str,
                      apply: Callable[[Conn], Awaitable[dict[str, Any]]],
                      before_commit: BeforeCommit[dict[str, Any]] | None) -> dict[str, Any]:
    """Lock the invocation, check the caller may drive it, apply the transition: one transaction."""
    async def transition(conn: Conn) -> dict[str, Any]:
        row = await store.get(conn, zone_id, invocation_id, lock=True)
        if row is None:
            raise CoordinatorError(404, "invocation_not_found")
        if not authz.can_invoke(ident, row["service_application_id"]):
            raise CoordinatorError(403, "invoker_ownership_required")
        return store.projection(await apply(conn))
    return await db.run(transition, before_commit=before_commit)


async def start(db: Database, ident: Identity, zone_id: str, invocation_id: str,
                before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    return await _transition(db, ident, zone_id, invocation_id,
                             lambda conn: store.start(conn, zone_id, invocation_id), before_commit)


async def cancel(db: Database, ident: Identity, zone_id: str, invocation_id: str, reason: str | None,
                 before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    return await _transition(db, ident, zone_id, invocation_id,
                             lambda conn: store.cancel(conn, zone_id, invocation_id, reason), before_commit)


async def complete(db: Database, ident: Identity, zone_id: str, invocation_id: str, status: str,
                   error: dict[str, Any] | None, metadata: dict[str, Any],
                   before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    return await _transition(db, ident, zone_id, invocation_id,
                             lambda conn: store.complete(conn, zone_id, invocation_id, status, error, metadata),
                             before_commit)
