"""Session routes (reference §4.4-4.10). Each command is one Postgres transaction whose answer is
the HTTP answer; the workflows hear of it through the workflow outbox (storage/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import Identity
from api.deps import Services, identity, services
from api.http import no_content, parse_body, parse_query, read_json, validate_body
from rules import authz
from rules.errors import CoordinatorError
from rules.idempotency import parse_idempotency_key, request_digest
from rules.ids import new_id
from rules.sessions import normalize_labels, resolve_ttl
from storage import sessions as store
from storage.idempotency import SESSION_START, IdempotencyRequest
from storage.db import Conn
from storage.pages import list_page

router = APIRouter(tags=["sessions"])

NonEmpty = Annotated[str, Field(min_length=1)]


class StartSessionBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    application_id: NonEmpty
    subject_session_id: NonEmpty | None = None
    parent_id: NonEmpty | None = None
    lifecycle: Literal["task", "service"] = "task"
    labels: list[str] = Field(default_factory=list, max_length=32)
    ttl_seconds: int | None = Field(default=None, ge=1, le=86400)
    parent_authority: Literal["inherit", "none"] = "inherit"
    inherit_parent_edge_id: NonEmpty | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        return normalize_labels(labels)


class PageQuery(BaseModel):
    limit: int = Field(default=100, ge=1, le=500)
    cursor: NonEmpty | None = None


class SessionListQuery(PageQuery):
    status: Literal["active", "suspended", "terminated", "expired"] | None = None
    lifecycle: Literal["task", "service"] | None = None
    application_id: NonEmpty | None = None
    label: NonEmpty | None = None


class DeleteQuery(BaseModel):
    reason: str = Field(default="requested", min_length=1, max_length=256)


class DeleteBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    lease_generation: int | None = Field(default=None, ge=0)


def idempotency_headers(request: Request) -> tuple[str | None, bool]:
    key = parse_idempotency_key(request.headers.getlist("idempotency-key"))
    generated = request.headers.get("idempotency-key-kind", "").strip().lower() == "generated"
    return key, generated


def created(result: dict[str, Any]) -> JSONResponse:
    headers = {"Idempotency-Replayed": "true"} if result.get("replayed") else {}
    return JSONResponse(result["body"], status_code=result["status"], headers=headers)


@router.post("/zones/{zone_id}/agents", status_code=201, summary="Create an agent session")
async def start_session(zone_id: str, request: Request, ident: Identity = Depends(identity),
                        svc: Services = Depends(services)) -> Response:
    body = await parse_body(request, StartSessionBody)
    record_id = body.subject_session_id or ident.authority_record_id
    if not record_id:
        raise CoordinatorError(400, "subject_session_id_required")
    if not authz.can_start_for(ident, body.application_id):
        raise CoordinatorError(403, "application_ownership_required")
    key, generated = idempotency_headers(request)
    ttl = resolve_ttl(body.lifecycle, body.ttl_seconds)
    digest = None
    if key is not None:
        digest = request_digest({
            "principal": {"client_id": ident.client_id, "subject": ident.subject},
            "application_id": body.application_id, "subject_authority_record_id": record_id,
            "parent_id": body.parent_id, "lifecycle": body.lifecycle, "labels": body.labels, "ttl_seconds": ttl,
            "parent_authority": body.parent_authority, "inherit_parent_edge_id": body.inherit_parent_edge_id,
            "metadata": body.metadata})
    idem = None if key is None else IdempotencyRequest(SESSION_START, zone_id, body.application_id, key, digest,
                                                       generated)
    cmd = store.StartSession(
        zone_id=zone_id, session_id=new_id(), application_id=body.application_id, authority_record_id=record_id,
        parent_id=body.parent_id, lifecycle=body.lifecycle, labels=body.labels, ttl_seconds=ttl,
        parent_authority=body.parent_authority, inherit_parent_edge_id=body.inherit_parent_edge_id,
        metadata=body.metadata, caller_client_id=ident.client_id, caller_scopes=sorted(ident.scopes))
    result = await svc.db.run(lambda conn: store.start_session(conn, svc.settings, cmd, idem))
    return created({"status": result.status, "body": result.body, "replayed": result.replayed})


@router.get("/zones/{zone_id}/agents", summary="List agent sessions")
async def list_sessions(zone_id: str, request: Request, ident: Identity = Depends(identity),
                        svc: Services = Depends(services)) -> dict[str, Any]:
    query = parse_query(request, SessionListQuery)
    sql = f"SELECT {store.SESSION_COLUMNS.replace('s.', 'x.')} FROM sessions x WHERE x.zone_id = %s"
    params: list[Any] = [zone_id]
    for column in ("status", "lifecycle", "application_id"):
        value = getattr(query, column)
        if value is not None:
            sql += f" AND x.{column} = %s"
            params.append(value)
    if query.label is not None:
        sql += " AND %s = ANY(x.labels)"
        params.append(query.label)
    return await list_page(svc.db, table="sessions", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=sql, params=params, project=store.full_projection)


@router.get("/zones/{zone_id}/agents/{session_id}", summary="Inspect one session")
async def get_session(zone_id: str, session_id: str, ident: Identity = Depends(identity),
                      svc: Services = Depends(services)) -> dict[str, Any]:
    return store.full_projection(await _session_or_404(svc, zone_id, session_id))


@router.get("/zones/{zone_id}/agents/{session_id}/children", summary="List child sessions")
async def list_children(zone_id: str, session_id: str, request: Request, ident: Identity = Depends(identity),
                        svc: Services = Depends(services)) -> dict[str, Any]:
    query = parse_query(request, SessionListQuery)  # filters validated, ignored (as the reference)
    sql = (f"SELECT {store.SESSION_COLUMNS.replace('s.', 'x.')} FROM agent_topology t "
           f"JOIN sessions x ON x.id = t.child_id WHERE t.parent_id = %s AND x.zone_id = %s")
    return await list_page(svc.db, table="sessions", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
                           sql=sql, params=[session_id, zone_id], project=store.child_projection)


async def _session_or_404(svc: Services, zone_id: str, session_id: str) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        row = await store.get_session(conn, zone_id, session_id)
    if row is None:
        raise CoordinatorError(404, "session_not_found")
    return row


async def locked_managed_session(conn: Conn, ident: Identity, zone_id: str, session_id: str) -> dict[str, Any]:
    """The session row, locked for the command's transaction: 404 when absent, 403 when not the caller's."""
    row = await store.get_session(conn, zone_id, session_id, lock=True)
    if row is None:
        raise CoordinatorError(404, "session_not_found")
    if not authz.can_manage_session(ident, row["application_id"]):
        raise CoordinatorError(403, "application_ownership_required")
    return row


@router.patch("/zones/{zone_id}/agents/{session_id}/suspend", summary="Suspend a session subtree")
async def suspend_session(zone_id: str, session_id: str, ident: Identity = Depends(identity),
                          svc: Services = Depends(services)) -> dict[str, Any]:
    async def suspend(conn: Conn) -> dict[str, Any]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        rows = await store.suspend_subtree(conn, zone_id, [session_id], "requested")
        if not rows:
            raise CoordinatorError(409, "session_not_found_or_not_active")
        return {"suspended": len(rows)}
    return await svc.db.run(suspend)


@router.patch("/zones/{zone_id}/agents/{session_id}/resume", summary="Resume a suspended session subtree")
async def resume_session(zone_id: str, session_id: str, ident: Identity = Depends(identity),
                         svc: Services = Depends(services)) -> dict[str, Any]:
    async def resume(conn: Conn) -> dict[str, Any]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        rows = await store.resume_subtree(conn, svc.settings, zone_id, session_id)
        if not rows:
            raise CoordinatorError(409, "session_not_found_or_not_suspended")
        return {"resumed": len(rows)}
    return await svc.db.run(resume)


@router.delete("/zones/{zone_id}/agents/{session_id}", status_code=204, summary="Terminate a session")
async def terminate_session(zone_id: str, session_id: str, request: Request, ident: Identity = Depends(identity),
                            svc: Services = Depends(services)) -> Response:
    query = parse_query(request, DeleteQuery)
    data = await read_json(request, required=False)
    body = DeleteBody() if data is None else validate_body(DeleteBody, data)

    async def terminate(conn: Conn) -> None:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        if row["status"] not in store.LIVE_STATUSES:
            raise CoordinatorError(404, "session_not_found")
        if row["lifecycle"] == "service":
            if body.lease_generation is None and not authz.is_admin(ident):
                raise CoordinatorError(400, "lease_generation_required")
            if body.lease_generation is not None and body.lease_generation != row["lease_generation"]:
                raise CoordinatorError(409, "session_lease_fenced")
        await store.terminate_subtree(conn, zone_id, [session_id], query.reason)
    await svc.db.run(terminate)
    return no_content()
