"""Agent services, service-session heartbeats and lease takeover (reference §4.11-4.13,
sdk-wire-contract §4.5 and §9).

A heartbeat writes the lease row only (no workflow notice per heartbeat, docs/DESIGN.md): the lease
timer re-reads the row when it fires (commands/services.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api import audit
from api.deps import Caller, ServicesDep
from api.routes.common import (
    INTEGRAL, Body, IgnoredBody, NonEmpty, Page, PageParams, SessionId, ZoneId, make_router,
)
from commands import services as commands
from storage import services as store

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
    answer = await commands.register(svc.db, ident, zone_id, body.model_dump(),
                                     before_commit=audit.with_commit(request, 201))
    return JSONResponse(answer, status_code=201)


@router.get("/zones/{zone_id}/agent-services", summary="List service agents")
async def list_services(zone_id: ZoneId, query: PageParams, ident: Caller,
                        svc: ServicesDep) -> Page:
    return await store.list_services(svc.db, zone_id, query.limit, query.cursor)


@router.post("/zones/{zone_id}/agents/{session_id}/heartbeat", summary="Refresh a service-agent lease")
async def heartbeat(zone_id: ZoneId, session_id: SessionId, body: Annotated[HeartbeatBody, BodyParam()],
                    ident: Caller, svc: ServicesDep, request: Request) -> dict[str, Any]:
    answer = await commands.heartbeat(svc.db, svc.settings, ident, zone_id, session_id, service_id=body.service_id,
                                      status=body.status, metadata=body.metadata,
                                      lease_generation=body.lease_generation,
                                      before_commit=audit.with_commit(request))
    answer["active_invocations"] = body.active_invocations
    return answer


@router.post("/zones/{zone_id}/agents/{session_id}/lease", summary="Take over a service session's lease")
async def take_lease(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                     body: IgnoredBody = None) -> dict[str, Any]:
    return await commands.take_lease(svc.db, svc.settings, ident, zone_id, session_id,
                                     before_commit=audit.with_commit(request, lambda r: None if r is None else 200))
