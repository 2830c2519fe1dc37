"""Agent services, service-session heartbeats and lease takeover (reference §4.11-4.13,
sdk-wire-contract §4.5 and §9).

A heartbeat writes the lease row directly (no workflow event per heartbeat, DESIGN.md); only a
heartbeat that finds the lease already lapsed asks the session's workflow to settle it first.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import AnyUrl, BaseModel, ConfigDict, Field

from api.auth import Identity
from api.deps import Services, identity, services
from api.http import parse_body, parse_query, read_json, validate_body
from api.routes.sessions import PageQuery, _command, _managed_session
from api.temporal_gateway import WorkflowClosed
from rules import authz
from rules.errors import CoordinatorError
from storage import services as store
from storage import sessions as session_store
from storage.pages import list_page
from workflows import models as m

router = APIRouter(tags=["services"])

NonEmpty = Annotated[str, Field(min_length=1)]


class Framework(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: NonEmpty
    version: str | None = None


class RegisterServiceBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    application_id: NonEmpty
    endpoint_url: AnyUrl
    protocol_versions: list[str] = Field(default_factory=list)
    framework: Framework | None = None
    capabilities: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    service_id: NonEmpty | None = None
    status: Literal["starting", "healthy", "degraded", "unhealthy"] = "healthy"
    active_invocations: int = Field(default=0, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)
    lease_generation: int | None = Field(default=None, ge=0)


@router.post("/zones/{zone_id}/agent-services", status_code=201, summary="Register or update a service agent")
async def register_service(zone_id: str, request: Request, ident: Identity = Depends(identity),
                           svc: Services = Depends(services)) -> JSONResponse:
    data = await read_json(request, required=True)
    parsed = validate_body(RegisterServiceBody, data)
    if not authz.can_register_service(ident, parsed.application_id):
        raise CoordinatorError(403, "application_ownership_required")
    body = parsed.model_dump()
    body["endpoint_url"] = data["endpoint_url"]  # as sent: AnyUrl would normalise it
    async with svc.db.transaction() as conn:
        row = await store.upsert_service(conn, zone_id, body)
    return JSONResponse(store.service_projection(row), status_code=201)


@router.get("/zones/{zone_id}/agent-services", summary="List service agents")
async def list_services(zone_id: str, request: Request, ident: Identity = Depends(identity),
                        svc: Services = Depends(services)) -> dict[str, Any]:
    query = parse_query(request, PageQuery)
    return await list_page(svc.db, table="agent_services", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=f"SELECT {store.SERVICE_COLUMNS} FROM agent_services x WHERE x.zone_id = %s",
                           params=[zone_id], project=store.service_projection)


@router.post("/zones/{zone_id}/agents/{session_id}/heartbeat", summary="Refresh a service-agent lease")
async def heartbeat(zone_id: str, session_id: str, request: Request, ident: Identity = Depends(identity),
                    svc: Services = Depends(services)) -> dict[str, Any]:
    body = await parse_body(request, HeartbeatBody)
    try:
        async with svc.db.transaction() as conn:
            row = await session_store.get_session(conn, zone_id, session_id, lock=True)
            if row is None:
                raise CoordinatorError(404, "session_not_found")
            if not authz.can_manage_session(ident, row["application_id"]):
                raise CoordinatorError(403, "application_ownership_required")
            answer = await store.heartbeat(conn, svc.settings, zone_id, row, service_id=body.service_id,
                                           status=body.status, metadata=body.metadata,
                                           lease_generation=body.lease_generation)
    except store.LeaseExpired:
        await _settle_lapsed_lease(svc, zone_id, session_id)
    answer["active_invocations"] = body.active_invocations
    return answer


@router.post("/zones/{zone_id}/agents/{session_id}/lease", summary="Take over a service session's lease")
async def take_lease(zone_id: str, session_id: str, ident: Identity = Depends(identity),
                     svc: Services = Depends(services)) -> dict[str, Any]:
    row = await _managed_session(svc, ident, zone_id, session_id)
    if row["status"] not in session_store.LIVE_STATUSES:
        raise CoordinatorError(409, "session_not_live")
    if row["lifecycle"] != "service":
        raise CoordinatorError(409, "session_not_service")
    lapsed = await svc.db.fetchval("SELECT status = 'active' AND heartbeat_deadline_at <= now() FROM sessions "
                                   "WHERE id = %s", (session_id,))
    if lapsed:
        # As for a late heartbeat: a lapsed lease is settled (subtree suspended), never revived.
        await _settle_lapsed_lease(svc, zone_id, session_id)
    return await _command(svc, zone_id, session_id, "take_lease", m.SessionCommand(zone_id, session_id),
                          CoordinatorError(409, "session_not_live"))


async def _settle_lapsed_lease(svc: Services, zone_id: str, session_id: str) -> None:
    """Have the session's workflow settle its lapsed lease now, then refuse the caller."""
    try:
        await svc.temporal.session_update(zone_id, session_id, "settle_now", m.SessionCommand(zone_id, session_id))
    except WorkflowClosed:
        pass
    raise CoordinatorError(409, "session_lease_expired")
