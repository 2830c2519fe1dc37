"""Invocation routes (reference §4.14-4.17): create/start/cancel/complete are one Postgres
transaction each (the invocation's workflow hears of it through the workflow outbox); reads come
from Postgres."""

from __future__ import annotations

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
from commands import invocations as commands
from rules.errors import CoordinatorError
from rules.idempotency import validate_idempotency_key
from storage import invocations as store

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
    req = commands.CreateInvocationRequest(
        service_id=body.service_id, source_session_id=body.source_session_id,
        target_session_id=body.target_session_id, method=body.method, params=body.params, metadata=body.metadata,
        timeout_ms=body.timeout_ms, retry_policy=body.retry_policy.model_dump())

    async def charge_rate() -> None:
        await ratelimit.check_invocation_rate(request.app.state, zone_id, _client_key(request, ident))
    return created(await commands.create(svc.db, svc.settings, ident, zone_id, req,
                                         validate_idempotency_key(body.idempotency_key), charge_rate,
                                         before_commit=audit.with_commit(request, lambda r: r.status)))


@router.get("/zones/{zone_id}/invocations", summary="List invocations")
async def list_invocations(zone_id: ZoneId, query: InvocationListParams, ident: Caller,
                           svc: ServicesDep) -> Page:
    return await store.list_invocations(svc.db, zone_id, store.InvocationFilter(
        status=query.status, service_id=query.service_id, session_id=query.session_id), query.limit, query.cursor)


@router.get("/zones/{zone_id}/invocations/{invocation_id}", summary="Inspect an invocation")
async def get_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller,
                         svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        row = await store.get(conn, zone_id, invocation_id)
    if row is None:
        raise CoordinatorError(404, "invocation_not_found")
    return store.projection(row)


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/start", summary="Mark an invocation running",
               dependencies=RATE_CHARGED)
async def start_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller, svc: ServicesDep,
                           request: Request, body: IgnoredBody = None) -> dict[str, Any]:
    return await commands.start(svc.db, ident, zone_id, invocation_id, before_commit=audit.with_commit(request))


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/cancel", summary="Cancel an invocation",
               dependencies=RATE_CHARGED)
async def cancel_invocation(zone_id: ZoneId, invocation_id: InvocationId, ident: Caller, svc: ServicesDep,
                            request: Request, body: Annotated[CancelBody | None, BodyParam()] = None
                            ) -> dict[str, Any]:
    reason = body.reason if body is not None else None
    return await commands.cancel(svc.db, ident, zone_id, invocation_id, reason,
                                 before_commit=audit.with_commit(request))


@router.patch("/zones/{zone_id}/invocations/{invocation_id}/complete", summary="Complete an invocation",
               dependencies=RATE_CHARGED)
async def complete_invocation(zone_id: ZoneId, invocation_id: InvocationId,
                              body: Annotated[CompleteBody, BodyParam()], ident: Caller,
                              svc: ServicesDep, request: Request) -> dict[str, Any]:
    return await commands.complete(svc.db, ident, zone_id, invocation_id, body.status, body.error, body.metadata,
                                   before_commit=audit.with_commit(request))
