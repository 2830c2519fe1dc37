"""Admin audit middleware (reference §11.1); the chain itself is storage/audit.py.

Only requests with an attached identity (`request.state.identity`, set by `api.deps.identity`)
are recorded, except on /health, /ready, /metrics and /stats:

* a POST/PUT/PATCH/DELETE answered with a status < 400 is recorded *before* its response starts;
  if that insert fails the client gets `500 {"error":"audit_unavailable","message":…}` instead
  (the mutation itself is already committed). A command route records it in its own transaction
  instead, as the last statement before the COMMIT (`with_commit`): one commit instead of two.
  A failed append there is rolled back alone (migration 0006), so the answer is the same;
* any request answered with a status >= 400 is recorded best-effort once the response is sent;
* successful GETs (and other reads) are not recorded.

The record: actor_id = token sub, actor_name = client_id, actor_scope = the scopes (sorted, space
separated), path without the query, zone = the route's zone (or the first /zones/<z> segment), and
entity = the last (agents|agent-services|delegations|invocations|applications|resources|
authority-records)/<next segment> pair of the path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import split_path
from storage.audit import AuditEntry, PendingAppend, append, append_at_commit
from storage.db import Conn

log = logging.getLogger("coordinator.audit")

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics", "/stats"})
MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The reference's five entity kinds, plus our directory's resources and authority records.
ENTITY_SEGMENTS = frozenset({"agents", "agent-services", "delegations", "invocations", "applications",
                             "resources", "authority-records"})


def entity_of(path: str) -> tuple[str | None, str | None]:
    """`/zones/z/agents/a1/suspend` → ("agents", "a1"); `/zones/z/agents` → (None, None)."""
    segments = split_path(path)
    found: tuple[str | None, str | None] = (None, None)
    for i, segment in enumerate(segments[:-1]):
        if segment in ENTITY_SEGMENTS and segments[i + 1]:
            found = (segment, segments[i + 1])
    return found


def zone_of(scope: Scope) -> str | None:
    zone = (scope.get("path_params") or {}).get("zone_id")
    if zone:
        return zone
    segments = split_path(scope.get("raw_path") or scope["path"])
    if len(segments) >= 2 and segments[0] == "zones" and segments[1]:
        return segments[1]
    return None


def entry_for(scope: Scope, status: int) -> AuditEntry | None:
    identity = (scope.get("state") or {}).get("identity")
    if identity is None:
        return None
    path = scope["path"]
    entity_type, entity_id = entity_of(path)
    return AuditEntry(
        request_id=(scope.get("state") or {}).get("request_id"),
        actor_id=identity.subject, actor_name=identity.client_id, actor_scope=" ".join(sorted(identity.scopes)),
        method=scope["method"], path=path, zone_id=zone_of(scope), entity_type=entity_type, entity_id=entity_id,
        status_code=status)


async def record(scope: Scope, entry: AuditEntry) -> None:
    app_state = scope["app"].state
    svc = app_state.services
    await append(svc.db, entry, svc.settings.audit_key_bytes)


# Request state: (status, PendingAppend) of the record a command wrote in its own transaction.
IN_TRANSACTION = "audit_in_transaction"


def with_commit(request: Request, status: int | Callable[[Any], int | None] = 200
                ) -> Callable[[Conn, Any], Awaitable[None]]:
    """`Database.run(..., before_commit=with_commit(request, status))`: the request's audit record,
    written with the command's COMMIT for the answer `status` (or `status(result)`; None: the
    command's result is not the answer, nothing is written). The middleware then only checks it,
    when the response starts with that status."""

    async def before_commit(conn: Conn, result: Any) -> None:
        code = status(result) if callable(status) else status
        entry = None if code is None else entry_for(request.scope, code)
        if entry is not None:
            pending = await append_at_commit(conn, entry, request.app.state.services.settings.audit_key_bytes)
            request.scope.setdefault("state", {})[IN_TRANSACTION] = (code, pending)

    return before_commit


def _written_in_transaction(scope: Scope, status: int) -> PendingAppend | None:
    done = (scope.get("state") or {}).get(IN_TRANSACTION)
    if done is None or done[0] != status or done[1].result.rows is None:
        return None  # none, or for another answer, or its transaction did not commit
    return done[1]


async def _record_success(scope: Scope, status: int) -> None:
    """The record of a successful mutation, before its response starts: checked when the command
    wrote it with its COMMIT, else written now. Raises when it is not written."""
    written = _written_in_transaction(scope, status)
    if written is not None:
        written.stored()  # raises AuditUnavailable when the append was rolled back
        return
    entry = entry_for(scope, status)
    if entry is not None:
        await record(scope, entry)


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        mutation = scope["method"] in MUTATIONS
        status: int | None = None
        replaced = False

        async def audited_send(message: Message) -> None:
            nonlocal status, replaced
            if replaced:
                return  # the app's own response was swapped for audit_unavailable
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if mutation and status < 400:
                    try:
                        await _record_success(scope, status)
                    except Exception as exc:
                        log.error("audit record for %s %s failed: %r", scope["method"], scope["path"], exc)
                        replaced, status = True, 500
                        await _audit_unavailable(send)
                        return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if status is None:
                await self._best_effort(scope, 500)
            raise
        if status is not None and status >= 400:
            await self._best_effort(scope, status)

    async def _best_effort(self, scope: Scope, status: int) -> None:
        entry = entry_for(scope, status)
        if entry is None:
            return
        try:
            await record(scope, entry)
        except Exception as exc:  # best effort: the response is already on its way
            log.warning("audit record for failed %s %s not written: %r", scope["method"], scope["path"], exc)


async def _audit_unavailable(send: Send) -> None:
    body = json.dumps({"error": "audit_unavailable",
                       "message": "the admin audit record could not be written; the change itself was applied"},
                      separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 500, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
