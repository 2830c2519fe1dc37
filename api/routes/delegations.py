"""Delegation routes (reference §4.18-4.23, sdk-wire-contract §9): create and revoke are one
Postgres transaction each (the endpoints' workflows hear of them through the workflow outbox);
every read (lists, traverse, impact, effective authority) is Postgres."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body as BodyParam
from fastapi import Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from api import audit
from api.deps import Caller, ServicesDep
from api.routes.common import (
    INTEGRAL, AsOfPageParams, AsOfQuery, Body, EdgeId, IdempotencyKeyHeader, NonEmpty, Page, SessionId, ZoneId,
    checked_instant, created, idempotency_headers, list_query, make_router,
)
from commands import delegations as commands
from rules.constraints import MAX_BROAD_REASON, MAX_BUDGET, MAX_HOPS, MAX_RESOURCES, MAX_TTL_SECONDS, MISSING
from rules.errors import CoordinatorError
from rules.timefmt import is_iso_z, iso_ms, parse_rfc3339
from storage import bulk_revocation as bulk
from storage import delegations as store
from storage import history

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
    req = commands.CreateDelegation(
        source_session_id=body.source_session_id, target_session_id=body.target_session_id,
        issuer_application_id=body.issuer_application_id, receiver_application_id=body.receiver_application_id,
        parent_edge_id=body.parent_edge_id, resource_id=body.resource_id, scopes=body.scopes,
        constraints_json=body.given("constraints_json"), constraints=body.given("constraints"),
        expires_at=body.expires_at, ttl_seconds=body.ttl_seconds)
    key, _ = idempotency_headers(request)
    return created(await commands.create(svc.db, svc.settings, ident, zone_id, req, key,
                                         before_commit=audit.with_commit(request, lambda r: r.status)))


@router.get("/zones/{zone_id}/delegations/active", summary="List active delegation edges (now, or as of `at`)")
async def active_edges(zone_id: ZoneId, query: AsOfPageParams, ident: Caller,
                       svc: ServicesDep) -> Page:
    where = store.EdgeFilter(active=True, at=await checked_instant(svc, query.at))
    return await store.list_edges(svc.db, zone_id, where, query.limit, query.cursor)


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}",
            summary="List inbound edges for a session (now, or as of `at`)")
async def inbound_edges(zone_id: ZoneId, session_id: SessionId, query: AsOfPageParams,
                        ident: Caller, svc: ServicesDep) -> Page:
    where = store.EdgeFilter(target_session_id=session_id, at=await checked_instant(svc, query.at))
    return await store.list_edges(svc.db, zone_id, where, query.limit, query.cursor)


@router.get("/zones/{zone_id}/delegations/outbound/{session_id}",
            summary="List outbound edges for a session (now, or as of `at`)")
async def outbound_edges(zone_id: ZoneId, session_id: SessionId, query: AsOfPageParams,
                         ident: Caller, svc: ServicesDep) -> Page:
    where = store.EdgeFilter(source_session_id=session_id, at=await checked_instant(svc, query.at))
    return await store.list_edges(svc.db, zone_id, where, query.limit, query.cursor)


@router.get("/zones/{zone_id}/delegations/inbound/{session_id}/{edge_id}",
            summary="One inbound edge, while it is active")
async def inbound_edge(zone_id: ZoneId, session_id: SessionId, edge_id: EdgeId, ident: Caller,
                       svc: ServicesDep) -> dict[str, Any]:
    body = await store.active_inbound_edge(svc.db, zone_id, session_id, edge_id)
    if body is None:
        raise CoordinatorError(404, "delegation_not_found")
    return body


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


class EffectiveAuthorityQuery(AsOfQuery):
    explain: bool = Field(default=False, description="Add `explanation`: the chains of edges granting each scope "
                                                     "and resource, and why each other inbound edge adds nothing")


@router.get("/zones/{zone_id}/agents/{session_id}/effective-authority",
            summary="Compute effective authority for a session (now, or as of `at`; `explain`)")
async def effective_authority(zone_id: ZoneId, session_id: SessionId,
                              query: Annotated[EffectiveAuthorityQuery, list_query(EffectiveAuthorityQuery)],
                              ident: Caller, svc: ServicesDep) -> dict[str, Any]:
    at = await checked_instant(svc, query.at)
    async with svc.db.connection() as conn:
        return await store.effective_authority(conn, zone_id, session_id, at=at, explain=query.explain)


@router.get("/zones/{zone_id}/history/window", summary="The instants `at=` answers for")
async def history_window(zone_id: ZoneId, ident: Caller, svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        bounds = await history.window(conn, svc.settings)
    return {"earliest": iso_ms(bounds.earliest), "latest": iso_ms(bounds.latest),
            "retention_days": svc.settings.DELEGATION_RETENTION_DAYS}


@router.patch("/zones/{zone_id}/delegations/{edge_id}/revoke", summary="Revoke delegated authority")
async def revoke(zone_id: ZoneId, edge_id: EdgeId, query: Annotated[RevokeQuery, Query()], ident: Caller,
                 svc: ServicesDep, request: Request,
                 body: Annotated[RevokeBody | None, BodyParam()] = None) -> dict[str, Any]:
    expected = query.expected_epoch if query.expected_epoch is not None else (
        body.expected_epoch if body is not None else None)

    return await commands.revoke(svc.db, ident, zone_id, edge_id, expected,
                                 before_commit=audit.with_commit(request))


class BulkRevokeFilter(Body):
    # A misspelt key must not widen what a revocation takes: unknown keys are refused.
    model_config = ConfigDict(extra="forbid")

    issuer_application_id: NonEmpty | None = None
    receiver_application_id: NonEmpty | None = None
    resource_id: NonEmpty | None = Field(default=None, description="A resource row id or identifier, on the edge "
                                                                   "or among its constraints' resources")
    scope: NonEmpty | None = None
    created_before: str | None = Field(default=None, json_schema_extra={"format": "date-time"},
                                       description="RFC 3339 with its offset")
    created_after: str | None = Field(default=None, json_schema_extra={"format": "date-time"},
                                      description="RFC 3339 with its offset")
    source_subtree_of: NonEmpty | None = Field(default=None, description="Edges whose source is the named session or "
                                                                         "one of its descendants")


    @field_validator("created_before", "created_after")
    @classmethod
    def _instant(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rfc3339(value)
        return value

    def selection(self) -> bulk.EdgeSelection:
        values = self.model_dump()
        for name in ("created_before", "created_after"):
            values[name] = parse_rfc3339(values[name]) if values[name] is not None else None
        return bulk.EdgeSelection(**values)


class BulkRevokeBody(Body):
    filter: BulkRevokeFilter
    dry_run: bool = Field(default=False, description="Answer the impact and the zone's graph epoch; change nothing")
    expected_epoch: Annotated[int, Field(ge=0), INTEGRAL] | None = Field(
        default=None, description="Required unless dry_run: the preview's epoch (409 if the graph moved)")


@router.post("/zones/{zone_id}/delegations/bulk-revoke",
             summary="Revoke every active edge matching a filter, with their cascades (or preview it)")
async def bulk_revoke(zone_id: ZoneId, body: Annotated[BulkRevokeBody, BodyParam()], request: Request,
                      ident: Caller, svc: ServicesDep, idempotency_key: IdempotencyKeyHeader = None) -> dict[str, Any]:
    selection = body.filter.selection()
    key, _ = idempotency_headers(request)
    return await commands.bulk_revoke(
        svc.db, svc.settings, ident, zone_id,
        commands.BulkRevocation(selection=selection, dry_run=body.dry_run, expected_epoch=body.expected_epoch),
        key, before_commit=audit.with_commit(request))
