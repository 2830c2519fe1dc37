"""Invocation routes (reference §4.14-4.17): create/start/cancel/complete are one Postgres
transaction each (the invocation's workflow hears of it through the workflow outbox); reads come
from Postgres."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api import audit, ratelimit
from api.auth import Identity
from api.deps import Caller, ServicesDep
from api.routes.common import (
    list_query,
    INTEGRAL, Body, IgnoredBody, InvocationId, NonEmpty, Page, PageQuery, QueryText, ZoneId, created, make_router,
)
from rules import authz
from rules.errors import CoordinatorError
from rules.idempotency import request_digest, validate_idempotency_key
from rules.ids import new_id
from storage import invocations as store
from storage.idempotency import INVOCATION_CREATE, IdempotencyRequest
from storage.db import Conn
from storage.pages import list_page

router = make_router("invocations")


class RetryPolicyBody(Body):
    max_attempts: Annotated[int, Field(ge=1, le=10), INTEGRAL] = 3
    backoff_ms: Annotated[int, Field(ge=0, le=300000), INTEGRAL] = 1000


class CreateInvocationBody(Body):
    service_id: NonEmpty
    source_session_id: NonEmpty | None = None
    target_session_id: NonEmpty | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255, description="Also §7's format rules")]
    method: NonEmpty
    params: Any = Field(default_factory=dict, description="Any JSON value")
    metadata: dict[str, Any] = Field(default_factory=dict)
    timeout_ms: Annotated[int, Field(ge=1, le=900000), INTEGRAL] = 30000
    retry_policy: RetryPolicyBody = Field(default_factory=RetryPolicyBody)


class CancelBody(Body):
    reason: NonEmpty | None = None


class CompleteBody(Body):
    status: Literal["succeeded", "failed"]
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class InvocationListQuery(PageQuery):
    status: Literal["pending", "running", "succeeded", "failed", "cancel_requested", "canceled", "timed_out",
                    "dead"] | None = None
    service_id: QueryText | None = None
    session_id: QueryText | None = Field(default=None, description="Source or target session")


InvocationListParams = Annotated[InvocationListQuery, list_query(InvocationListQuery)]


def _client_key(request: Request, ident: Identity) -> str:
    return ident.client_id or (request.client.host if request.client else "unknown")


async def charge_invocation_rate(zone_id: ZoneId, request: Request, ident: Caller) -> None:
    """start/cancel/complete: the invocation rate limit is charged first, before the body is
    validated and before any database access (reference §4.17)."""
    await ratelimit.check_invocation_rate(request.app.state, zone_id, _client_key(request, ident))


RATE_CHARGED = [Depends(charge_invocation_rate)]


@router.post("/zones/{zone_id}/invocations", status_code=201, summary="Create an invocation")
async def create_invocation(zone_id: ZoneId, body: Annotated[CreateInvocationBody, BodyParam()], request: Request,
                            ident: Caller, svc: ServicesDep) -> JSONResponse:
    key = validate_idempotency_key(body.idempotency_key)
    retry = body.retry_policy.model_dump()
    digest = request_digest({
        "principal": {"client_id": ident.client_id, "subject": ident.subject}, "service_id": body.service_id,
        "source_session_id": body.source_session_id, "target_session_id": body.target_session_id,
        "method": body.method, "params": body.params, "metadata": body.metadata, "timeout_ms": body.timeout_ms,
        "retry_policy": retry})

    async def create(conn: Conn) -> dict[str, Any]:
        source_app = await store.check_create(conn, zone_id, body.service_id,
                                              [body.source_session_id, body.target_session_id])
        if not authz.can_invoke(ident, source_app):
            raise CoordinatorError(403, "invoker_ownership_required")
        idem = IdempotencyRequest(INVOCATION_CREATE, zone_id, source_app, key, digest)
        replay = await store.replay(conn, svc.settings, idem)
        if replay is not None:  # answered from the receipt: not rate limited
            return {**replay, "replayed": True}
        await ratelimit.check_invocation_rate(request.app.state, zone_id, _client_key(request, ident))
        cmd = store.CreateInvocation(
            zone_id=zone_id, invocation_id=new_id(), service_id=body.service_id,
            source_session_id=body.source_session_id, target_session_id=body.target_session_id, method=body.method,
            params=body.params, metadata=body.metadata, timeout_ms=body.timeout_ms, retry_policy=retry,
            scope_id=source_app)
        return await store.create(conn, svc.settings, cmd, idem)
    return created(await svc.db.run(create, before_commit=audit.with_commit(request, lambda r: r["status"])))


@router.get("/zones/{zone_id}/invocations", summary="List invocations")
async def list_invocations(zone_id: ZoneId, query: InvocationListParams, ident: Caller,
                           svc: ServicesDep) -> Page:
    sql = f"SELECT {store.INVOCATION_COLUMNS} FROM agent_invocations x WHERE x.zone_id = %s"
    params: list[Any] = [zone_id]
    if query.status:
        sql, params = sql + " AND x.status = %s", params + [query.status]
    if query.service_id:
        sql, params = sql + " AND x.service_id = %s", params + [query.service_id]
    if query.session_id:
        sql, params = sql + " AND (x.source_session_id = %s OR x.target_session_id = %s)", \
            params + [query.session_id, query.session_id]
    return await list_page(svc.db, table="agent_invocations", zone_id=zone_id, limit=query.limit,
                           cursor=query.cursor, sql=sql, params=params, project=store.list_projection)


@router.get("/zones/{zone_id}/invocations/{invocation_id}", summary="Inspect an invocation")
async def get_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller,
                         svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        row = await store.get(conn, zone_id, invocation_id)
    if row is None:
        raise CoordinatorError(404, "invocation_not_found")
    return store.projection(row)


async def _transition(svc: ServicesDep, request: Request, ident: Identity, zone_id: str, invocation_id: str,
                      apply: Callable[[Conn], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Lock the invocation, check the caller may drive it, apply the transition: one transaction."""
    async def transition(conn: Conn) -> dict[str, Any]:
        row = await store.get(conn, zone_id, invocation_id, lock=True)
        if row is None:
            raise CoordinatorError(404, "invocation_not_found")
        if not authz.can_invoke(ident, row["service_application_id"]):
            raise CoordinatorError(403, "invoker_ownership_required")
        return store.projection(await apply(conn))
    return await svc.db.run(transition, before_commit=audit.with_commit(request))


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/start", summary="Mark an invocation running",
               dependencies=RATE_CHARGED)
async def start_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller, svc: ServicesDep,
                           request: Request, body: IgnoredBody = None) -> dict[str, Any]:
    return await _transition(svc, request, ident, zone_id, invocation_id,
                             lambda conn: store.start(conn, zone_id, invocation_id))


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/cancel", summary="Cancel an invocation",
               dependencies=RATE_CHARGED)
async def cancel_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller, svc: ServicesDep,
                            request: Request, body: Annotated[CancelBody | None, BodyParam()] = None
                            ) -> dict[str, Any]:
    reason = body.reason if body is not None else None
    return await _transition(svc, request, ident, zone_id, invocation_id,
                             lambda conn: store.cancel(conn, zone_id, invocation_id, reason))


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/complete", summary="Complete an invocation",
               dependencies=RATE_CHARGED)
async def complete_invocation(zone_id: ZoneId, invocation_id: InvocationId,
                              body: Annotated[CompleteBody, BodyParam()], ident: Caller,
                              svc: ServicesDep, request: Request) -> dict[str, Any]:
    return await _transition(svc, request, ident, zone_id, invocation_id,
                             lambda conn: store.complete(conn, zone_id, invocation_id, body.status, body.error,
                                                         body.metadata))
