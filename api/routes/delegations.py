"""Delegation routes (reference §4.18-4.23, sdk-wire-contract §9): create and revoke are one
Postgres transaction each (the endpoints' workflows hear of them through the workflow outbox);
every read (lists, traverse, impact, effective authority) is Postgres."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import Identity
from api.deps import Services, identity, services
from api.http import parse_query, read_json, validate_body
from api.routes.sessions import PageQuery, created
from rules import authz
from rules.constraints import MISSING, apply_broad_defaults, normalize_constraints
from rules.errors import CoordinatorError
from rules.idempotency import parse_idempotency_key, request_digest
from rules.ids import new_id
from rules.timefmt import is_iso_z
from storage import delegations as store
from storage.idempotency import DELEGATION_CREATE, IdempotencyRequest
from storage.db import Conn
from storage.pages import list_page

router = APIRouter(tags=["delegations"])

NonEmpty = Annotated[str, Field(min_length=1)]


class CreateDelegationBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    source_session_id: NonEmpty
    target_session_id: NonEmpty
    issuer_application_id: NonEmpty
    receiver_application_id: NonEmpty
    parent_edge_id: NonEmpty | None = None
    resource_id: NonEmpty | None = None
    scopes: list[NonEmpty] = Field(default_factory=list)
    expires_at: str | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=86400)

    @field_validator("expires_at")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is not None and not is_iso_z(value):
            raise ValueError("Invalid ISO datetime")
        return value


class RevokeBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    expected_epoch: int | None = Field(default=None, ge=0)


class RevokeQuery(BaseModel):
    expected_epoch: int | None = Field(default=None, ge=0)


@router.post("/zones/{zone_id}/delegations", status_code=201, summary="Create a delegation edge")
async def create_delegation(zone_id: str, request: Request, ident: Identity = Depends(identity),
                            svc: Services = Depends(services)) -> JSONResponse:
    data = await read_json(request, required=True)
    body = validate_body(CreateDelegationBody, data)
    constraints = normalize_constraints(data.get("constraints_json", MISSING), data.get("constraints", MISSING),
                                        body.ttl_seconds)
    requested = body.expires_at or constraints.get("expires_at")
    ttl = constraints.get("ttl_seconds") if requested is None else None
    if requested is None and ttl is None:
        raise CoordinatorError(400, "delegation_expiry_required")
    if not authz.can_issue(ident, body.issuer_application_id):
        raise CoordinatorError(403, "issuer_ownership_required")
    if (body.receiver_application_id != body.issuer_application_id
            and not authz.can_receive(ident, body.receiver_application_id, body.issuer_application_id)):
        raise CoordinatorError(403, "receiver_consent_required")
    if body.source_session_id == body.target_session_id:
        raise CoordinatorError(400, "self_delegation_denied")
    scoped = body.resource_id is not None or bool(constraints.get("resources"))
    if not scoped:
        if not authz.can_delegate_broad(ident, body.issuer_application_id):
            raise CoordinatorError(403, "broad_delegation_permission_required")
        constraints = apply_broad_defaults(constraints)
    key = parse_idempotency_key(request.headers.getlist("idempotency-key"))
    digest = None
    if key is not None:
        digest = request_digest({
            "principal": {"client_id": ident.client_id, "subject": ident.subject},
            "source_session_id": body.source_session_id, "target_session_id": body.target_session_id,
            "issuer_application_id": body.issuer_application_id,
            "receiver_application_id": body.receiver_application_id, "parent_edge_id": body.parent_edge_id,
            "resource_id": body.resource_id, "scopes": sorted(body.scopes), "constraints": constraints,
            "expires_at": requested, "ttl_seconds": ttl})
    idem = None if key is None else IdempotencyRequest(DELEGATION_CREATE, zone_id, body.issuer_application_id, key,
                                                       digest)
    cmd = store.CreateEdge(
        zone_id=zone_id, edge_id=new_id(), source_session_id=body.source_session_id,
        target_session_id=body.target_session_id, issuer_application_id=body.issuer_application_id,
        receiver_application_id=body.receiver_application_id, parent_edge_id=body.parent_edge_id,
        resource_id=body.resource_id, scopes=body.scopes, constraints=constraints, requested_expires_at=requested,
        ttl_seconds=ttl, body_ttl_seconds=body.ttl_seconds, broad=not scoped)
    return created(await svc.db.run(lambda conn: store.create_edge(conn, svc.settings, cmd, idem)))


async def _edge_page(svc: Services, request: Request, zone_id: str, where: str, params: list[Any],
                     project=store.edge_projection) -> dict[str, Any]:
    query = parse_query(request, PageQuery)
    return await list_page(svc.db, table="delegation_edges", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=f"SELECT {store.EDGE_COLUMNS} FROM delegation_edges x WHERE x.zone_id = %s {where}",
                           params=[zone_id, *params], project=project)


@router.get("/zones/{zone_id}/delegations/active", summary="List active delegation edges")
async def active_edges(zone_id: str, request: Request, ident: Identity = Depends(identity),
                       svc: Services = Depends(services)) -> dict[str, Any]:
    return await _edge_page(svc, request, zone_id, "AND x.status = 'active' AND x.expires_at > now()", [],
                            store.active_projection)


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}", summary="List inbound edges for a session")
async def inbound_edges(zone_id: str, session_id: str, request: Request, ident: Identity = Depends(identity),
                        svc: Services = Depends(services)) -> dict[str, Any]:
    return await _edge_page(svc, request, zone_id, "AND x.target_session_id = %s", [session_id])


@router.get("/zones/{zone_id}/delegations/outbound/{session_id}", summary="List outbound edges for a session")
async def outbound_edges(zone_id: str, session_id: str, request: Request, ident: Identity = Depends(identity),
                         svc: Services = Depends(services)) -> dict[str, Any]:
    return await _edge_page(svc, request, zone_id, "AND x.source_session_id = %s", [session_id])


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}/{edge_id}",
            summary="One inbound edge, while it is active")
async def inbound_edge(zone_id: str, session_id: str, edge_id: str, ident: Identity = Depends(identity),
                       svc: Services = Depends(services)) -> dict[str, Any]:
    row = await svc.db.fetchrow(f"""SELECT {store.EDGE_COLUMNS} FROM delegation_edges x
                                    WHERE x.zone_id = %s AND x.id = %s AND x.target_session_id = %s
                                      AND x.status = 'active' AND x.expires_at > now()""",
                                (zone_id, edge_id, session_id))
    if row is None:
        raise CoordinatorError(404, "delegation_not_found")
    return store.edge_projection(row)


def _require_admin(ident: Identity) -> None:
    if not (ident.operator or authz.is_admin(ident)):
        raise CoordinatorError(403, "admin_scope_required")


@router.get("/zones/{zone_id}/delegations/{edge_id}/traverse", summary="Traverse a delegation edge")
async def traverse(zone_id: str, edge_id: str, ident: Identity = Depends(identity),
                   svc: Services = Depends(services)) -> JSONResponse:
    _require_admin(ident)
    async with svc.db.connection() as conn:
        rows = await store.traverse(conn, zone_id, edge_id)
    return JSONResponse(rows)


@router.get("/zones/{zone_id}/delegations/{edge_id}/impact", summary="Compute revocation impact")
async def impact(zone_id: str, edge_id: str, ident: Identity = Depends(identity),
                 svc: Services = Depends(services)) -> dict[str, Any]:
    _require_admin(ident)
    async with svc.db.connection() as conn:
        result = await store.impact(conn, zone_id, edge_id)
    if result is None:
        raise CoordinatorError(404, "delegation_not_found")
    return result


@router.get("/zones/{zone_id}/agents/{session_id}/effective-authority",
            summary="Compute effective authority for a session")
async def effective_authority(zone_id: str, session_id: str, ident: Identity = Depends(identity),
                              svc: Services = Depends(services)) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        return await store.effective_authority(conn, zone_id, session_id)


@router.patch("/zones/{zone_id}/delegations/{edge_id}/revoke", summary="Revoke delegated authority")
async def revoke(zone_id: str, edge_id: str, request: Request, ident: Identity = Depends(identity),
                 svc: Services = Depends(services)) -> dict[str, Any]:
    query = parse_query(request, RevokeQuery)
    data = await read_json(request, required=False)
    body = RevokeBody() if data is None else validate_body(RevokeBody, data)
    expected = query.expected_epoch if query.expected_epoch is not None else body.expected_epoch

    async def revoke_edge(conn: Conn) -> dict[str, Any]:
        edge = await store.get_edge(conn, zone_id, edge_id)
        if edge is None:
            raise CoordinatorError(404, "delegation_not_found")
        if not authz.can_revoke(ident, edge["issuer_application_id"]):
            raise CoordinatorError(403, "issuer_ownership_required")
        return await store.revoke_cascade(conn, zone_id, edge_id, expected)
    return await svc.db.run(revoke_edge)
