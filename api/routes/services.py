"""Agent services, service-session heartbeats and lease takeover (reference §4.11-4.13,
sdk-wire-contract §4.5 and §9).

A heartbeat writes the lease row only (no workflow notice per heartbeat, DESIGN.md): the lease
timer re-reads the row when it fires. A heartbeat or takeover that finds the lease already lapsed
settles it (subtree suspended) in its own transaction and is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NoReturn

from fastapi import Body as BodyParam
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api import audit
from api.deps import Caller, ServicesDep
from api.routes.common import (
    INTEGRAL, Body, IgnoredBody, NonEmpty, Page, PageParams, SessionId, ZoneId, locked_managed_session, make_router,
)
from rules import authz
from rules.errors import CoordinatorError
from rules.timefmt import iso_ms
from storage import services as store
from storage import sessions as session_store
from storage.db import Conn
from storage.pages import list_page

router = make_router("services")

# Only absolute http(s) URLs: the endpoint is where invocations are sent, never a script.
ENDPOINT_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@]+(?:[/?#]\S*)?$"


class Framework(Body):
    name: NonEmpty
    version: str | None = None


class RegisterServiceBody(Body):
    application_id: NonEmpty
    endpoint_url: Annotated[str, Field(max_length=2048, pattern=ENDPOINT_URL_PATTERN,
                                       description="Absolute http(s) URL, stored as sent")]
    protocol_versions: list[NonEmpty] = Field(default_factory=list)
    framework: Framework | None = None
    capabilities: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class HeartbeatBody(Body):
    service_id: NonEmpty | None = None
    status: Literal["starting", "healthy", "degraded", "unhealthy"] = "healthy"
    active_invocations: Annotated[int, Field(ge=0), INTEGRAL] = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    lease_generation: Annotated[int, Field(ge=0), INTEGRAL] | None = None


@router.post("/zones/{zone_id}/agent-services", status_code=201, summary="Register or update a service agent")
async def register_service(zone_id: ZoneId, body: Annotated[RegisterServiceBody, BodyParam()], ident: Caller,
                           svc: ServicesDep, request: Request) -> JSONResponse:
    if not authz.can_register_service(ident, body.application_id):
        raise CoordinatorError(403, "application_ownership_required")
    row = await svc.db.run(lambda conn: store.upsert_service(conn, zone_id, body.model_dump()),
                           before_commit=audit.with_commit(request, 201))
    return JSONResponse(store.service_projection(row), status_code=201)


@router.get("/zones/{zone_id}/agent-services", summary="List service agents")
async def list_services(zone_id: ZoneId, query: PageParams, ident: Caller,
                        svc: ServicesDep) -> Page:
    return await list_page(svc.db, table="agent_services", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=f"SELECT {store.SERVICE_COLUMNS} FROM agent_services x WHERE x.zone_id = %s",
                           params=[zone_id], project=store.service_projection)


@router.post("/zones/{zone_id}/agents/{session_id}/heartbeat", summary="Refresh a service-agent lease")
async def heartbeat(zone_id: ZoneId, session_id: SessionId, body: Annotated[HeartbeatBody, BodyParam()],
                    ident: Caller, svc: ServicesDep, request: Request) -> dict[str, Any]:
    async def beat(conn: Conn) -> dict[str, Any]:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        return await store.heartbeat(conn, svc.settings, zone_id, row, service_id=body.service_id,
                                     status=body.status, metadata=body.metadata,
                                     lease_generation=body.lease_generation)
    try:
        answer = await svc.db.run(beat, before_commit=audit.with_commit(request))
    except store.LeaseExpired:
        await _settle_lapsed_lease(svc, zone_id, session_id)
    answer["active_invocations"] = body.active_invocations
    return answer


@router.post("/zones/{zone_id}/agents/{session_id}/lease", summary="Take over a service session's lease")
async def take_lease(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                     body: IgnoredBody = None) -> dict[str, Any]:
    async def take(conn: Conn) -> dict[str, Any] | None:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        if row["status"] == "active" and row["lifecycle"] == "service" and await store.lease_lapsed(conn, session_id):
            return None  # settled below, in its own transaction: a lapsed lease is never revived
        taken = await session_store.take_lease(conn, svc.settings, zone_id, row)
        return {"agent_session_id": session_id, "status": taken["status"],
                "heartbeat_deadline_at": iso_ms(taken["heartbeat_deadline_at"]),
                "lease_generation": taken["lease_generation"]}
    answer = await svc.db.run(take, before_commit=audit.with_commit(request, lambda r: None if r is None else 200))
    if answer is None:
        await _settle_lapsed_lease(svc, zone_id, session_id)
    return answer


async def _settle_lapsed_lease(svc: ServicesDep, zone_id: str, session_id: str) -> NoReturn:
    """Settle the lapsed lease now (the workflow's timer may not have fired yet), then refuse."""
    await svc.db.run(lambda conn: session_store.settle_deadline(conn, zone_id, session_id))
    raise CoordinatorError(409, "session_lease_expired")
