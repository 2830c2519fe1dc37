"""Session routes (reference §4.4-4.10). Each command is one Postgres transaction whose answer is
the HTTP answer; the workflows hear of it through the workflow outbox (storage/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from api import audit
from api.deps import Caller, ServicesDep
from api.http import no_content, rendered_json
from api.routes.common import (
    list_query,
    INTEGRAL, Body, IdempotencyKeyHeader, IgnoredBody, NonEmpty, Page, PageQuery, QueryText, SessionId,
    ZoneId, absent, created, idempotency_headers, locked_managed_session, make_router,
)
from rules import authz
from rules.errors import CoordinatorError
from rules.idempotency import request_digest
from rules.ids import new_id
from rules.sessions import MAX_LABEL_LENGTH, MAX_LABELS, normalize_labels, resolve_ttl
from storage import sessions as store
from storage.idempotency import SESSION_START, IdempotencyRequest
from storage.db import Conn
from storage.pages import json_page

router = make_router("sessions")

TtlSeconds = Annotated[int, Field(ge=1, le=86400), INTEGRAL]
# Trimmed (JavaScript trim), then 1-64 UTF-16 code units: normalize_labels checks; the schema says so.
Label = Annotated[str, Field(json_schema_extra={"minLength": 1, "maxLength": MAX_LABEL_LENGTH,
                                                "pattern": "[^\\s\ufeff]"})]


class StartSessionBody(Body):
    application_id: NonEmpty
    subject_session_id: NonEmpty = absent(description="Authority record id; default: the mandate's sid")
    parent_id: NonEmpty | None = None
    lifecycle: Literal["task", "service"] = "task"
    labels: list[Label] = Field(default_factory=list, max_length=MAX_LABELS,
                                description="Each trimmed, then 1-64 characters")
    ttl_seconds: TtlSeconds = absent(
        description="Default: 3600 for a task, none for a service")
    parent_authority: Literal["inherit", "none"] = "inherit"
    inherit_parent_edge_id: NonEmpty = absent()
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        return normalize_labels(labels)


class SessionListQuery(PageQuery):
    status: Literal["active", "suspended", "terminated", "expired"] | None = None
    lifecycle: Literal["task", "service"] | None = None
    application_id: QueryText | None = None
    label: QueryText | None = Field(default=None, description="Sessions carrying this label")


SessionListParams = Annotated[SessionListQuery, list_query(SessionListQuery)]


class DeleteQuery(BaseModel):
    reason: str = Field(default="requested", min_length=1, max_length=256, pattern=r"^[^\x00]+$")


class DeleteBody(Body):
    lease_generation: Annotated[int, Field(ge=0), INTEGRAL] | None = Field(
        default=None, description="Required for a service session (unless coordinator.admin)")


@router.post("/zones/{zone_id}/agents", status_code=201, summary="Create an agent session")
async def start_session(zone_id: ZoneId, body: Annotated[StartSessionBody, BodyParam()], request: Request,
                        ident: Caller, svc: ServicesDep, idempotency_key: IdempotencyKeyHeader = None,
                        idempotency_key_kind: Annotated[str | SkipJsonSchema[None], Header(
                            alias="Idempotency-Key-Kind",
                            description="`generated`: a client-generated key, kept 24 h instead of 7 days")] = None,
                        ) -> Response:
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
    idem = None if key is None or digest is None else IdempotencyRequest(
        SESSION_START, zone_id, body.application_id, key, digest, generated)
    cmd = store.StartSession(
        zone_id=zone_id, session_id=new_id(), application_id=body.application_id, authority_record_id=record_id,
        parent_id=body.parent_id, lifecycle=body.lifecycle, labels=body.labels, ttl_seconds=ttl,
        parent_authority=body.parent_authority, inherit_parent_edge_id=body.inherit_parent_edge_id,
        metadata=body.metadata, caller_client_id=ident.client_id, caller_scopes=sorted(ident.scopes))
    result = await store.start(svc.db, svc.settings, cmd, idem,
                               before_commit=audit.with_commit(request, lambda r: r.status))
    return created({"status": result.status, "body": result.body, "replayed": result.replayed})


@router.get("/zones/{zone_id}/agents", summary="List agent sessions", response_model=Page)
async def list_sessions(zone_id: ZoneId, query: SessionListParams, ident: Caller,
                        svc: ServicesDep) -> Response:
    sql = "FROM sessions x WHERE x.zone_id = %s"
    params: list[Any] = [zone_id]
    for column in ("status", "lifecycle", "application_id"):
        value = getattr(query, column)
        if value is not None:
            sql += f" AND x.{column} = %s"
            params.append(value)
    if query.label is not None:
        sql += " AND %s = ANY(x.labels)"
        params.append(query.label)
    return rendered_json(await json_page(
        svc.db, table="sessions", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
        body=store.SESSION_BODY, id_key="agent_session_id", sql_from=sql, params=params))


@router.get("/zones/{zone_id}/agents/{session_id}", summary="Inspect one session", response_model=dict[str, Any])
async def get_session(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep) -> Response:
    body = await store.session_body(svc.db, zone_id, session_id)
    if body is None:
        raise CoordinatorError(404, "session_not_found")
    return rendered_json(body)


@router.get("/zones/{zone_id}/agents/{session_id}/children", summary="List child sessions", response_model=Page)
async def list_children(zone_id: ZoneId, session_id: SessionId, query: SessionListParams,
                        ident: Caller, svc: ServicesDep) -> Response:
    # The filters are validated and ignored, as the reference does.
    sql = "FROM agent_topology t JOIN sessions x ON x.id = t.child_id WHERE t.parent_id = %s AND x.zone_id = %s"
    return rendered_json(await json_page(
        svc.db, table="sessions", zone_id=zone_id, limit=query.limit, cursor=query.cursor,
        body=store.CHILD_BODY, id_key="agent_session_id", sql_from=sql, params=[session_id, zone_id]))


@router.patch("/zones/{zone_id}/agents/{session_id}/suspend", summary="Suspend a session subtree")
async def suspend_session(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                          body: IgnoredBody = None) -> dict[str, int]:
    async def suspend(conn: Conn) -> dict[str, int]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        suspended = await store.suspend_subtree(conn, zone_id, [session_id], "requested")
        if not suspended:
            raise CoordinatorError(409, "session_not_found_or_not_active")
        return {"suspended": suspended}
    return await svc.db.run(suspend, before_commit=audit.with_commit(request))


@router.patch("/zones/{zone_id}/agents/{session_id}/resume", summary="Resume a suspended session subtree")
async def resume_session(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                         body: IgnoredBody = None) -> dict[str, int]:
    async def resume(conn: Conn) -> dict[str, int]:
        await locked_managed_session(conn, ident, zone_id, session_id)
        resumed = await store.resume_subtree(conn, svc.settings, zone_id, session_id)
        if not resumed:
            raise CoordinatorError(409, "session_not_found_or_not_suspended")
        return {"resumed": resumed}
    return await svc.db.run(resume, before_commit=audit.with_commit(request))


@router.delete("/zones/{zone_id}/agents/{session_id}", status_code=204, summary="Terminate a session",
               response_class=Response)
async def terminate_session(zone_id: ZoneId, session_id: SessionId, query: Annotated[DeleteQuery, Query()],
                            ident: Caller, svc: ServicesDep, request: Request,
                            body: Annotated[DeleteBody | None, BodyParam()] = None) -> Response:
    lease_generation = body.lease_generation if body is not None else None

    async def terminate(conn: Conn) -> None:
        row = await locked_managed_session(conn, ident, zone_id, session_id)
        if row["status"] not in store.LIVE_STATUSES:
            raise CoordinatorError(404, "session_not_found")
        if row["lifecycle"] == "service":
            if lease_generation is None and not authz.is_admin(ident):
                raise CoordinatorError(400, "lease_generation_required")
            if lease_generation is not None and lease_generation != row["lease_generation"]:
                raise CoordinatorError(409, "session_lease_fenced")
        await store.terminate_subtree(conn, zone_id, [session_id], query.reason)
    await svc.db.run(terminate, before_commit=audit.with_commit(request, 204))
    return no_content()
