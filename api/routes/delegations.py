"""Delegation routes (reference §4.18-4.23, sdk-wire-contract §9): create and revoke are one
Postgres transaction each (the endpoints' workflows hear of them through the workflow outbox);
every read (lists, traverse, impact, effective authority) is Postgres."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body as BodyParam
from fastapi import Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, WithJsonSchema, field_validator

from api import audit
from api.deps import Caller, ServicesDep
from api.routes.common import (
    INTEGRAL, Body, EdgeId, IdempotencyKeyHeader, NonEmpty, Page, PageParams, PageQuery, SessionId, ZoneId, created,
    make_router,
)
from rules import authz
from rules.constraints import MAX_BROAD_REASON, MAX_BUDGET, MAX_HOPS, MAX_RESOURCES, MAX_TTL_SECONDS, MISSING
from rules.constraints import apply_broad_defaults, normalize_constraints
from rules.errors import CoordinatorError
from rules.idempotency import parse_idempotency_key, request_digest
from rules.ids import new_id
from rules.timefmt import is_iso_z
from storage import delegations as store
from storage.idempotency import DELEGATION_CREATE, IdempotencyRequest
from storage.db import Conn
from storage.pages import list_page

router = make_router("delegations")

ISO_Z = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"

# The typed constraint object (§6.3). The route takes any JSON value here and checks it itself, so
# that a wrong one answers the reference's `invalid_<key>` / `invalid_delegation_constraint`.
CONSTRAINTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Typed constraints. max_depth is an alias of max_hops (both given: equal).",
    "properties": {
        "resources": {"type": "array", "maxItems": MAX_RESOURCES, "items": {"type": "string", "minLength": 1}},
        "max_depth": {"type": "integer", "minimum": 1, "maximum": MAX_HOPS},
        "max_hops": {"type": "integer", "minimum": 1, "maximum": MAX_HOPS},
        "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_SECONDS},
        "budget": {"type": "integer", "minimum": 1, "maximum": MAX_BUDGET},
        "policy_approved": {"type": "boolean"},
        "expires_at": {"type": "string", "format": "date-time", "pattern": ISO_Z},
        "broad_reason": {"type": "string", "minLength": 1, "maxLength": MAX_BROAD_REASON},
    },
}
Constraints = Annotated[Any, WithJsonSchema(CONSTRAINTS_SCHEMA)]


class CreateDelegationBody(Body):
    source_session_id: NonEmpty
    target_session_id: NonEmpty
    issuer_application_id: NonEmpty
    receiver_application_id: NonEmpty
    parent_edge_id: NonEmpty | None = None
    resource_id: NonEmpty | None = Field(default=None, description="Resource row id or public identifier")
    scopes: list[NonEmpty] = Field(default_factory=list)
    constraints: Constraints = None
    constraints_json: Constraints = None
    expires_at: Annotated[str | None, Field(json_schema_extra={"format": "date-time", "pattern": ISO_Z})] = Field(
        default=None, description="ISO-8601 UTC (`Z`); else `ttl_seconds` or a constraint gives the expiry")
    ttl_seconds: Annotated[int, Field(ge=1, le=86400), INTEGRAL] | None = None

    @field_validator("expires_at")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is not None and not is_iso_z(value):
            raise ValueError("Invalid ISO datetime")
        return value

    def given(self, name: str) -> Any:
        return getattr(self, name) if name in self.model_fields_set else MISSING


class RevokeBody(Body):
    expected_epoch: Annotated[int, Field(ge=0), INTEGRAL] | None = None


class RevokeQuery(BaseModel):
    expected_epoch: int | None = Field(default=None, ge=0, description="Refuse (409) if the zone graph moved on")


@router.post("/zones/{zone_id}/delegations", status_code=201, summary="Create a delegation edge")
async def create_delegation(zone_id: ZoneId, body: Annotated[CreateDelegationBody, BodyParam()], request: Request,
                            ident: Caller, svc: ServicesDep,
                            idempotency_key: IdempotencyKeyHeader = None) -> JSONResponse:
    constraints = normalize_constraints(body.given("constraints_json"), body.given("constraints"), body.ttl_seconds)
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
    idem = None if key is None or digest is None else IdempotencyRequest(
        DELEGATION_CREATE, zone_id, body.issuer_application_id, key, digest)
    cmd = store.CreateEdge(
        zone_id=zone_id, edge_id=new_id(), source_session_id=body.source_session_id,
        target_session_id=body.target_session_id, issuer_application_id=body.issuer_application_id,
        receiver_application_id=body.receiver_application_id, parent_edge_id=body.parent_edge_id,
        resource_id=body.resource_id, scopes=body.scopes, constraints=constraints, requested_expires_at=requested,
        ttl_seconds=ttl, body_ttl_seconds=body.ttl_seconds, broad=not scoped)
    return created(await svc.db.run(lambda conn: store.create_edge(conn, svc.settings, cmd, idem),
                                    before_commit=audit.with_commit(request, lambda r: r["status"])))


async def _edge_page(svc: ServicesDep, query: PageQuery, zone_id: str, where: str, params: list[Any],
                     project: Any = store.edge_projection) -> Page:
    return await list_page(svc.db, table="delegation_edges", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=f"SELECT {store.EDGE_COLUMNS} FROM delegation_edges x WHERE x.zone_id = %s {where}",
                           params=[zone_id, *params], project=project)


@router.get("/zones/{zone_id}/delegations/active", summary="List active delegation edges")
async def active_edges(zone_id: ZoneId, query: PageParams, ident: Caller,
                       svc: ServicesDep) -> Page:
    return await _edge_page(svc, query, zone_id, "AND x.status = 'active' AND x.expires_at > now()", [],
                            store.active_projection)


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}", summary="List inbound edges for a session")
async def inbound_edges(zone_id: ZoneId, session_id: SessionId, query: PageParams,
                        ident: Caller, svc: ServicesDep) -> Page:
    return await _edge_page(svc, query, zone_id, "AND x.target_session_id = %s", [session_id])


@router.get("/zones/{zone_id}/delegations/outbound/{session_id}", summary="List outbound edges for a session")
async def outbound_edges(zone_id: ZoneId, session_id: SessionId, query: PageParams,
                         ident: Caller, svc: ServicesDep) -> Page:
    return await _edge_page(svc, query, zone_id, "AND x.source_session_id = %s", [session_id])


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}/{edge_id}",
            summary="One inbound edge, while it is active")
async def inbound_edge(zone_id: ZoneId, session_id: SessionId, edge_id: EdgeId, ident: Caller,
                       svc: ServicesDep) -> dict[str, Any]:
    row = await svc.db.fetchrow(f"""SELECT {store.EDGE_COLUMNS} FROM delegation_edges x
                                    WHERE x.zone_id = %s AND x.id = %s AND x.target_session_id = %s
                                      AND x.status = 'active' AND x.expires_at > now()""",
                                (zone_id, edge_id, session_id))
    if row is None:
        raise CoordinatorError(404, "delegation_not_found")
    return store.edge_projection(row)


# Traverse and impact are open to any mandate of the zone, as in the reference: every other graph
# read (the edge lists, effective authority) already is, so restricting these hid nothing.


@router.get("/zones/{zone_id}/delegations/{edge_id}/traverse", summary="Traverse a delegation edge")
async def traverse(zone_id: ZoneId, edge_id: EdgeId, ident: Caller, svc: ServicesDep) -> list[dict[str, Any]]:
    async with svc.db.connection() as conn:
        rows: list[dict[str, Any]] = await store.traverse(conn, zone_id, edge_id)
    return rows


@router.get("/zones/{zone_id}/delegations/{edge_id}/impact", summary="Compute revocation impact")
async def impact(zone_id: ZoneId, edge_id: EdgeId, ident: Caller, svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        result = await store.impact(conn, zone_id, edge_id)
    if result is None:
        raise CoordinatorError(404, "delegation_not_found")
    return result


@router.get("/zones/{zone_id}/agents/{session_id}/effective-authority",
            summary="Compute effective authority for a session")
async def effective_authority(zone_id: ZoneId, session_id: SessionId, ident: Caller,
                              svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        return await store.effective_authority(conn, zone_id, session_id)


@router.patch("/zones/{zone_id}/delegations/{edge_id}/revoke", summary="Revoke delegated authority")
async def revoke(zone_id: ZoneId, edge_id: EdgeId, query: Annotated[RevokeQuery, Query()], ident: Caller,
                 svc: ServicesDep, request: Request,
                 body: Annotated[RevokeBody | None, BodyParam()] = None) -> dict[str, Any]:
    expected = query.expected_epoch if query.expected_epoch is not None else (
        body.expected_epoch if body is not None else None)

    async def revoke_edge(conn: Conn) -> dict[str, Any]:
        edge = await store.get_edge(conn, zone_id, edge_id)
        if edge is None:
            raise CoordinatorError(404, "delegation_not_found")
        if not authz.can_revoke(ident, edge["issuer_application_id"]):
            raise CoordinatorError(403, "issuer_ownership_required")
        return await store.revoke_cascade(conn, zone_id, edge_id, expected)
    return await svc.db.run(revoke_edge, before_commit=audit.with_commit(request))
