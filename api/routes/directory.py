"""Directory routes (operator token only): applications, resources and authority records."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.auth import Identity
from api.deps import Services, operator, services
from api.http import parse_body
from rules.errors import CoordinatorError
from rules.timefmt import parse_iso_z
from storage import directory as store
from storage.db import q1
from psycopg import errors as pg_errors

router = APIRouter(tags=["directory"])

NonEmpty = Annotated[str, Field(min_length=1)]


def _iso(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected an ISO-8601 datetime string")
    return parse_iso_z(value)


class ApplicationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    registration_method: Literal["managed", "dcr"] = "managed"
    expires_at: datetime | None = None

    _parse = field_validator("expires_at", mode="before")(classmethod(lambda cls, v: _iso(v)))

    @model_validator(mode="after")
    def _dcr_expires(self) -> "ApplicationBody":
        if self.registration_method == "dcr" and self.expires_at is None:
            raise ValueError("dcr applications need expires_at")
        return self


class ResourceBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    identifier: NonEmpty
    scopes: list[NonEmpty] = Field(default_factory=list)


class AuthorityRecordBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_type: Literal["user", "application"]
    subject_id: NonEmpty
    expires_at: datetime

    _parse = field_validator("expires_at", mode="before")(classmethod(lambda cls, v: _iso(v)))


async def _one(svc: Services, sql: str, params: tuple, project, missing: str) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        row = await q1(conn, sql, params)
    if row is None:
        raise CoordinatorError(404, missing)
    return project(row)


@router.put("/zones/{zone_id}/applications/{app_id}", summary="Create or update an application")
async def put_application(zone_id: str, app_id: str, request: Request, ident: Identity = Depends(operator),
                          svc: Services = Depends(services)) -> dict[str, Any]:
    body = await parse_body(request, ApplicationBody)
    async with svc.db.transaction() as conn:
        row = await store.put_application(conn, zone_id, app_id, body.registration_method, body.expires_at)
    return store.application_projection(row)


@router.get("/zones/{zone_id}/applications/{app_id}", summary="Inspect an application")
async def get_application(zone_id: str, app_id: str, ident: Identity = Depends(operator),
                          svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM applications WHERE zone_id = %s AND id = %s", (zone_id, app_id),
                      store.application_projection, "application_not_found")


@router.post("/zones/{zone_id}/applications/{app_id}/archive", summary="Archive an application")
async def archive_application(zone_id: str, app_id: str, ident: Identity = Depends(operator),
                              svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, """UPDATE applications SET archived_at = COALESCE(archived_at, now()), updated_at = now()
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, app_id),
                      store.application_projection, "application_not_found")


@router.put("/zones/{zone_id}/resources/{resource_id}", summary="Create or update a resource")
async def put_resource(zone_id: str, resource_id: str, request: Request, ident: Identity = Depends(operator),
                       svc: Services = Depends(services)) -> dict[str, Any]:
    body = await parse_body(request, ResourceBody)
    try:
        async with svc.db.transaction() as conn:
            row = await store.put_resource(conn, zone_id, resource_id, body.identifier, body.scopes)
    except pg_errors.UniqueViolation:
        raise CoordinatorError(409, "resource_identifier_taken")
    return store.resource_projection(row)


@router.get("/zones/{zone_id}/resources/{resource_id}", summary="Inspect a resource")
async def get_resource(zone_id: str, resource_id: str, ident: Identity = Depends(operator),
                       svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM resources WHERE zone_id = %s AND id = %s", (zone_id, resource_id),
                      store.resource_projection, "resource_not_found")


@router.post("/zones/{zone_id}/resources/{resource_id}/archive", summary="Archive a resource")
async def archive_resource(zone_id: str, resource_id: str, ident: Identity = Depends(operator),
                           svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, """UPDATE resources SET archived_at = COALESCE(archived_at, now()), updated_at = now()
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, resource_id),
                      store.resource_projection, "resource_not_found")


@router.put("/zones/{zone_id}/authority-records/{record_id}", summary="Create or update an authority record")
async def put_authority_record(zone_id: str, record_id: str, request: Request, ident: Identity = Depends(operator),
                               svc: Services = Depends(services)) -> dict[str, Any]:
    body = await parse_body(request, AuthorityRecordBody)
    async with svc.db.transaction() as conn:
        row = await store.put_authority_record(conn, zone_id, record_id, body.session_type, body.subject_id,
                                               body.expires_at)
    return store.authority_record_projection(row)


@router.get("/zones/{zone_id}/authority-records/{record_id}", summary="Inspect an authority record")
async def get_authority_record(zone_id: str, record_id: str, ident: Identity = Depends(operator),
                               svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM authority_records WHERE zone_id = %s AND id = %s", (zone_id, record_id),
                      store.authority_record_projection, "authority_record_not_found")


@router.post("/zones/{zone_id}/authority-records/{record_id}/revoke", summary="Revoke an authority record")
async def revoke_authority_record(zone_id: str, record_id: str, ident: Identity = Depends(operator),
                                  svc: Services = Depends(services)) -> dict[str, Any]:
    return await _one(svc, """UPDATE authority_records SET status = 'revoked', revoked_at = COALESCE(revoked_at, now()),
                                  revoked_reason = COALESCE(revoked_reason, 'operator_revoked')
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, record_id),
                      store.authority_record_projection, "authority_record_not_found")
