"""Delegation commands (reference §4.18 create, §4.23 revoke): load → check → write, one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rules.identity import Identity
from rules import authz
from rules.constraints import apply_broad_defaults, normalize_constraints
from rules.errors import CoordinatorError
from rules.idempotency import request_digest
from rules.ids import new_id
from rules.narrowing import check_narrowing
from rules.timefmt import iso_ms, parse_iso_z
from settings import Settings
from storage import bulk_revocation as bulk
from storage import delegations as store
from storage.db import BeforeCommit, Conn, Database
from storage.idempotency import (
    BULK_REVOCATION, DELEGATION_CREATE, CreateResult, IdempotencyRequest, find_receipt, inactive_result,
    store_receipt,
)



@dataclass(frozen=True)
class CreateDelegation:
    """A delegation create as the request gave it (`constraints*`: the raw JSON, MISSING when absent)."""

    source_session_id: str
    target_session_id: str
    issuer_application_id: str
    receiver_application_id: str
    parent_edge_id: str | None
    resource_id: str | None
    scopes: list[str]
    constraints_json: Any
    constraints: Any
    expires_at: str | None
    ttl_seconds: int | None


def _request_checks(ident: Identity, zone_id: str, req: CreateDelegation) -> store.CreateEdge:
    """Steps 1-6: constraints, expiry, ownership and consent, self-delegation, broad permission."""
    constraints = normalize_constraints(req.constraints_json, req.constraints, req.ttl_seconds)
    requested = req.expires_at or constraints.get("expires_at")
    ttl = constraints.get("ttl_seconds") if requested is None else None
    if requested is None and ttl is None:
        raise CoordinatorError(400, "delegation_expiry_required")
    if not authz.can_issue(ident, req.issuer_application_id):
        raise CoordinatorError(403, "issuer_ownership_required")
    if (req.receiver_application_id != req.issuer_application_id
            and not authz.can_receive(ident, req.receiver_application_id, req.issuer_application_id)):
        raise CoordinatorError(403, "receiver_consent_required")
    if req.source_session_id == req.target_session_id:
        raise CoordinatorError(400, "self_delegation_denied")
    scoped = req.resource_id is not None or bool(constraints.get("resources"))
    if not scoped:
        if not authz.can_delegate_broad(ident, req.issuer_application_id):
            raise CoordinatorError(403, "broad_delegation_permission_required")
        constraints = apply_broad_defaults(constraints)
    return store.CreateEdge(
        zone_id=zone_id, edge_id=new_id(), source_session_id=req.source_session_id,
        target_session_id=req.target_session_id, issuer_application_id=req.issuer_application_id,
        receiver_application_id=req.receiver_application_id, parent_edge_id=req.parent_edge_id,
        resource_id=req.resource_id, scopes=req.scopes, constraints=constraints, requested_expires_at=requested,
        ttl_seconds=ttl, body_ttl_seconds=req.ttl_seconds, broad=not scoped)


def _idempotency(ident: Identity, cmd: store.CreateEdge, key: str | None) -> IdempotencyRequest | None:
    if key is None:
        return None
    digest = request_digest({
        "principal": {"client_id": ident.client_id, "subject": ident.subject},
        "source_session_id": cmd.source_session_id, "target_session_id": cmd.target_session_id,
        "issuer_application_id": cmd.issuer_application_id, "receiver_application_id": cmd.receiver_application_id,
        "parent_edge_id": cmd.parent_edge_id, "resource_id": cmd.resource_id, "scopes": sorted(cmd.scopes),
        "constraints": cmd.constraints, "expires_at": cmd.requested_expires_at, "ttl_seconds": cmd.ttl_seconds})
    return IdempotencyRequest(DELEGATION_CREATE, cmd.zone_id, cmd.issuer_application_id, key, digest)


@dataclass(frozen=True)
class CheckedEdge:
    parent: dict[str, Any] | None
    resource_id: str | None  # the canonical id of the named resource
    resources: list[dict[str, Any]]  # every resolved resource, by row id
    expires_at: Any


def _resolve_resources(cmd: store.CreateEdge, ctx: store.CreateContext) -> tuple[str | None, list[dict[str, Any]]]:
    """§6.4: the canonical resource id and the resolved resource rows (union by row id)."""
    rows: dict[str, dict[str, Any]] = {}
    canonical = None
    if cmd.resource_id is not None:
        if ctx.resource is None:
            raise CoordinatorError(404, "resource_not_found")
        canonical = ctx.resource["id"]
        rows[canonical] = ctx.resource
    if cmd.constraints.get("resources"):
        if len(ctx.resources) != len(set(cmd.constraints["resources"])):
            raise CoordinatorError(404, "resource_not_found")
        if cmd.resource_id is not None and not any(cmd.resource_id in (r["id"], r["identifier"])
                                                   for r in ctx.resources):
            raise CoordinatorError(400, "delegation_resource_scope_mismatch")
        for r in ctx.resources:
            rows.setdefault(r["id"], r)
    return canonical, list(rows.values())


def _parent_edge(cmd: store.CreateEdge, ctx: store.CreateContext) -> dict[str, Any] | None:
    if not ctx.parents:
        return None
    if cmd.parent_edge_id is not None:
        parent = next((p for p in ctx.parents if p["id"] == cmd.parent_edge_id), None)
        if parent is None:
            raise CoordinatorError(403, "parent_delegation_not_active")
        return parent
    if len(ctx.parents) > 1:
        raise CoordinatorError(409, "parent_delegation_ambiguous")
    return ctx.parents[0]


def check_create(cmd: store.CreateEdge, ctx: store.CreateContext) -> CheckedEdge:
    """Steps 7-15 in the reference's order, on what `load_create_context` read."""
    apps = {sid: r["application_id"] for sid, r in ctx.endpoints.items()}
    if cmd.source_session_id not in apps or cmd.target_session_id not in apps:
        raise CoordinatorError(404, "delegation_endpoint_not_found")
    if (apps[cmd.source_session_id] != cmd.issuer_application_id
            or apps[cmd.target_session_id] != cmd.receiver_application_id):
        raise CoordinatorError(409, "delegation_application_mismatch")
    resource_id, resolved = _resolve_resources(cmd, ctx)
    if resolved and not set(cmd.scopes) <= {s for r in resolved for s in r["scopes"]}:
        raise CoordinatorError(403, "delegation_scopes_exceed_resource")
    requested = parse_iso_z(cmd.requested_expires_at) if cmd.requested_expires_at else None
    parent = _parent_edge(cmd, ctx)
    if parent is not None and not check_narrowing(
            {"scopes": list(parent["scopes"]), "expires_at": parent["expires_at"],
             "resource_id": parent["resource_id"], "constraints": parent["constraints_json"]},
            {"scopes": cmd.scopes, "requested_expires_at": requested, "resource_id": resource_id,
             "resolved_resource_ids": [r["id"] for r in resolved],
             "resolved_identifiers": [r["identifier"] for r in resolved],
             "constraints": cmd.constraints, "ttl_seconds": cmd.body_ttl_seconds}):
        raise CoordinatorError(403, "delegation_exceeds_parent_authority")
    if ctx.cycle:
        raise CoordinatorError(409, "delegation_cycle_denied")
    expires_at = requested if requested is not None else ctx.now + timedelta(seconds=cmd.ttl_seconds or 0)
    if not expires_at > ctx.now or (parent is not None and expires_at > parent["expires_at"]):
        if parent is not None:
            raise CoordinatorError(403, "delegation_exceeds_parent_authority")
        raise CoordinatorError(400, "delegation_expired")
    return CheckedEdge(parent, resource_id, resolved, expires_at)


def _answer(cmd: store.CreateEdge, row: dict[str, Any], checked: CheckedEdge,
            ctx: store.CreateContext) -> dict[str, Any]:
    """The reference's create answer, built from what the insert writes."""
    body = store.edge_projection(row)
    body["delegation_edge_id"] = body.pop("id")
    parent, resource_id, resolved = checked.parent, checked.resource_id, checked.resources
    scoped = resource_id is not None or bool(resolved)
    body["warnings"] = [] if scoped else ["resource_null_delegation_broadens_resource_matching"]
    body["allow_reason"] = ["same_zone_endpoints_active",
                            "resource_scope_checked" if scoped else "broad_delegation_elevated",
                            "parent_authority_narrowed" if parent else "source_authority_root",
                            "typed_constraints_validated"]
    body["effective_authority"] = {
        "source_session_id": cmd.source_session_id, "target_session_id": cmd.target_session_id,
        "parent_edge_id": parent["id"] if parent else None, "resource_id": resource_id,
        "resources": [r["identifier"] for r in resolved], "scopes": cmd.scopes,
        "expires_at": iso_ms(row["expires_at"]), "max_hops": cmd.constraints.get("max_hops", 1),
        "ttl_seconds": cmd.constraints.get("ttl_seconds"), "broad": not scoped,
        "parent_edges_considered": [p["id"] for p in ctx.parents]}
    return body


async def create_edge(conn: Conn, settings: Settings, cmd: store.CreateEdge,
                      idempotency: IdempotencyRequest | None) -> CreateResult:
    """Steps 7-16 in one transaction: a replay from its receipt, else load → check → write."""
    if idempotency is not None:
        replay = await store.replay_create(conn, settings, idempotency, cmd.issuer_application_id)
        if replay is not None:
            return replay
    ctx = await store.load_create_context(conn, cmd)
    checked = check_create(cmd, ctx)
    row = {"id": cmd.edge_id, "zone_id": cmd.zone_id, "source_session_id": cmd.source_session_id,
           "target_session_id": cmd.target_session_id, "issuer_application_id": cmd.issuer_application_id,
           "receiver_application_id": cmd.receiver_application_id,
           "parent_edge_id": checked.parent["id"] if checked.parent else None, "resource_id": checked.resource_id,
           "scopes": cmd.scopes, "constraints_json": store.jsonb_key_order(cmd.constraints), "status": "active",
           "expires_at": checked.expires_at, "edge_version": 0, "revoked_at": None, "created_at": ctx.now}
    await store.write_edge(conn, row, cmd.constraints, ctx)
    body = _answer(cmd, row, checked, ctx)
    if idempotency is not None:
        await store_receipt(conn, settings, idempotency, resource_type="delegation_edge", resource_id=cmd.edge_id,
                            status=201, body=body)
    return CreateResult(201, body)


async def create(db: Database, settings: Settings, ident: Identity, zone_id: str, req: CreateDelegation,
                 idempotency_key: str | None, before_commit: BeforeCommit[CreateResult] | None = None
                 ) -> CreateResult:
    cmd = _request_checks(ident, zone_id, req)
    idem = _idempotency(ident, cmd, idempotency_key)
    return await db.run(lambda conn: create_edge(conn, settings, cmd, idem), before_commit=before_commit)


async def revoke(db: Database, ident: Identity, zone_id: str, edge_id: str, expected_epoch: int | None,
                 before_commit: BeforeCommit[dict[str, Any]] | None = None) -> dict[str, Any]:
    async def revoke_edge(conn: Conn) -> dict[str, Any]:
        edge = await store.get_edge(conn, zone_id, edge_id)
        if edge is None:
            raise CoordinatorError(404, "delegation_not_found")
        if not authz.can_revoke(ident, edge["issuer_application_id"]):
            raise CoordinatorError(403, "issuer_ownership_required")
        return await store.revoke_cascade(conn, zone_id, edge_id, expected_epoch)
    return await db.run(revoke_edge, before_commit=before_commit)


@dataclass(frozen=True)
class BulkRevocation:
    """A bulk revoke as the request gave it."""

    selection: bulk.EdgeSelection
    dry_run: bool
    expected_epoch: int | None


def _bulk_body(plan: bulk.Preview, settings: Settings, dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "epoch": plan.epoch, "matched_edges": plan.matched,
            "downstream_edges": plan.downstream, "terminated_sessions": plan.terminated,
            "counts": {"matched": len(plan.matched), "downstream": len(plan.downstream),
                       "terminated_sessions": len(plan.terminated)},
            "max_edges": settings.BULK_REVOKE_MAX_EDGES,
            "within_limit": plan.edge_count <= settings.BULK_REVOKE_MAX_EDGES}


async def bulk_revoke(db: Database, settings: Settings, ident: Identity, zone_id: str, req: BulkRevocation,
                      idempotency_key: str | None, before_commit: BeforeCommit[dict[str, Any]] | None = None
                      ) -> dict[str, Any]:
    """Preview (dry_run) or revoke every active edge the selection matches, with their cascades, in one
    transaction; the real call only while the zone's graph is still at `expected_epoch`."""
    if not authz.can_bulk_revoke(ident):
        raise CoordinatorError(403, "bulk_revoke_permission_required")
    if not req.selection.as_json():
        raise CoordinatorError(400, "bulk_filter_empty", message="name at least one filter key")
    if not req.dry_run and req.expected_epoch is None:
        raise CoordinatorError(400, "expected_epoch_required",
                               message="a bulk revocation takes the epoch of its preview")
    idem = None if idempotency_key is None or req.dry_run else IdempotencyRequest(
        BULK_REVOCATION, zone_id, ident.client_id, idempotency_key,
        request_digest({"filter": req.selection.as_json(), "expected_epoch": req.expected_epoch}))

    async def run(conn: Conn) -> dict[str, Any]:
        if idem is not None:
            receipt = await find_receipt(conn, settings, idem)
            if receipt is not None:
                done = await bulk.get_record(conn, zone_id, receipt.resource_id)
                if done is None:  # past the retention window: the key is spent
                    raise inactive_result()
                return dict(done["answer_json"])
        plan = await bulk.preview(conn, zone_id, req.selection, lock=not req.dry_run)
        body = _bulk_body(plan, settings, req.dry_run)
        if req.dry_run:
            return body
        if req.expected_epoch != plan.epoch:
            raise CoordinatorError(409, "delegation_graph_changed", epoch=plan.epoch)
        if not body["within_limit"]:
            raise CoordinatorError(422, "bulk_revoke_too_large", edges=plan.edge_count,
                                   max_edges=settings.BULK_REVOKE_MAX_EDGES)
        revocation_id = new_id()
        done = await bulk.revoke(conn, zone_id, plan, revocation_id=revocation_id)
        body = {**body, **done, "bulk_revocation_id": revocation_id}
        await bulk.record(conn, zone_id, revocation_id, actor=f"{ident.client_id}/{ident.subject}",
                          selection=req.selection, epoch_before=plan.epoch, answer=body)
        if idem is not None:  # the receipt names the record, which holds the answer
            await store_receipt(conn, settings, idem, resource_type="bulk_revocation", resource_id=revocation_id,
                                status=200, body={"bulk_revocation_id": revocation_id})
        return body
    return await db.run(run, before_commit=before_commit)
