"""Session routes (reference §4.4-4.10). Each command is one Postgres transaction whose answer is
the HTTP answer; the workflows hear of it through the workflow outbox (storage/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from api import audit
from api.deps import Caller, ServicesDep
from api.http import no_content, rendered_json
from api.routes.common import (
    list_query, AsOfParams, checked_instant,
    INTEGRAL, Body, IdempotencyKeyHeader, IgnoredBody, NonEmpty, Page, PageQuery, QueryText, SessionId,
    ZoneId, absent, created, idempotency_headers, make_router,
)
from commands import sessions as commands
from rules.errors import CoordinatorError
from rules.lifecycle import SessionStatus
from rules.sessions import MAX_LABEL_LENGTH, MAX_LABELS, normalize_labels
from storage import sessions as store

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
    status: SessionStatus | None = None
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
    key, generated = idempotency_headers(request)
    req = commands.StartSessionRequest(
        application_id=body.application_id, subject_session_id=body.subject_session_id, parent_id=body.parent_id,
        lifecycle=body.lifecycle, labels=body.labels, ttl_seconds=body.ttl_seconds,
        parent_authority=body.parent_authority, inherit_parent_edge_id=body.inherit_parent_edge_id,
        metadata=body.metadata)
    return created(await commands.start(svc.db, svc.settings, ident, zone_id, req,
                                        None if key is None else commands.IdempotencyKey(key, generated),
                                        before_commit=audit.with_commit(request, lambda r: r.status)))


@router.get("/zones/{zone_id}/agents", summary="List agent sessions", response_model=Page)
async def list_sessions(zone_id: ZoneId, query: SessionListParams, ident: Caller,
                        svc: ServicesDep) -> Response:
    where = store.SessionFilter(status=query.status, lifecycle=query.lifecycle,
                                application_id=query.application_id, label=query.label)
    return rendered_json(await store.list_sessions(svc.db, zone_id, where, query.limit, query.cursor))


@router.get("/zones/{zone_id}/agents/{session_id}", summary="Inspect one session", response_model=dict[str, Any])
async def get_session(zone_id: ZoneId, session_id: SessionId, query: AsOfParams, ident: Caller,
                      svc: ServicesDep) -> Response:
    at = await checked_instant(svc, query.at)
    if at is not None:
        then = await store.session_body_at(svc.db, zone_id, session_id, at)
        if then is None:
            raise CoordinatorError(404, "session_not_found")
        return JSONResponse(then)
    body = await store.session_body(svc.db, zone_id, session_id)
    if body is None:
        raise CoordinatorError(404, "session_not_found")
    return rendered_json(body)


@router.get("/zones/{zone_id}/agents/{session_id}/children", summary="List child sessions", response_model=Page)
async def list_children(zone_id: ZoneId, session_id: SessionId, query: SessionListParams,
                        ident: Caller, svc: ServicesDep) -> Response:
    # The filters are validated and ignored, as the reference does.
    return rendered_json(await store.list_children(svc.db, zone_id, session_id, query.limit, query.cursor))


@router.patch("/zones/{zone_id}/agents/{session_id}/suspend", summary="Suspend a session subtree")
async def suspend_session(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                          body: IgnoredBody = None) -> dict[str, int]:
    return await commands.suspend(svc.db, ident, zone_id, session_id, before_commit=audit.with_commit(request))


@router.patch("/zones/{zone_id}/agents/{session_id}/resume", summary="Resume a suspended session subtree")
async def resume_session(zone_id: ZoneId, session_id: SessionId, ident: Caller, svc: ServicesDep, request: Request,
                         body: IgnoredBody = None) -> dict[str, int]:
    return await commands.resume(svc.db, svc.settings, ident, zone_id, session_id,
                                 before_commit=audit.with_commit(request))


@router.delete("/zones/{zone_id}/agents/{session_id}", status_code=204, summary="Terminate a session",
               response_class=Response)
async def terminate_session(zone_id: ZoneId, session_id: SessionId, query: Annotated[DeleteQuery, Query()],
                            ident: Caller, svc: ServicesDep, request: Request,
                            body: Annotated[DeleteBody | None, BodyParam()] = None) -> Response:
    await commands.terminate(svc.db, ident, zone_id, session_id, query.reason,
                             body.lease_generation if body is not None else None,
                             before_commit=audit.with_commit(request, 204))
    return no_content()
