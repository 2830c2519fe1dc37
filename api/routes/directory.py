"""Directory routes (operator token only): applications, resources and authority records."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Depends
from psycopg import errors as pg_errors
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import ServicesDep, operator
from api.routes.common import Body, IgnoredBody, ItemId, NonEmpty, ZoneId, make_router
from rules.errors import CoordinatorError
from rules.timefmt import parse_iso_z
from storage import directory as store
from storage.db import q1

# Operator token only: a router-level dependency.
router = make_router("directory", dependencies=[Depends(operator)])

ISO_Z_DOC = {"type": "string", "format": "date-time", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"}


def _iso(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected an ISO-8601 datetime string")
    return parse_iso_z(value)


class ApplicationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    registration_method: Literal["managed", "dcr"] = "managed"
    expires_at: Annotated[datetime | None, Field(json_schema_extra={"anyOf": [ISO_Z_DOC, {"type": "null"}]})] = Field(
        default=None, description="Required for dcr")

    _parse = field_validator("expires_at", mode="before")(classmethod(lambda cls, v: _iso(v)))


class ResourceBody(Body):
    identifier: NonEmpty
    scopes: list[NonEmpty] = Field(default_factory=list)


class AuthorityRecordBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_type: Literal["user", "application"]
    subject_id: NonEmpty
    expires_at: Annotated[datetime, Field(json_schema_extra=ISO_Z_DOC)]

    _parse = field_validator("expires_at", mode="before")(classmethod(lambda cls, v: _iso(v)))


async def _one(svc: ServicesDep, sql: str, params: tuple[Any, ...], project: Any, missing: str) -> dict[str, Any]:
    async with svc.db.connection() as conn:
        row = await q1(conn, sql, params)
    if row is None:
        raise CoordinatorError(404, missing)
    return project(row)


@router.put("/zones/{zone_id}/applications/{app_id}", summary="Create or update an application")
async def put_application(zone_id: ZoneId, app_id: ItemId, body: Annotated[ApplicationBody, BodyParam()],
                          svc: ServicesDep) -> dict[str, Any]:
    if body.registration_method == "dcr" and body.expires_at is None:
        raise CoordinatorError(400, "dcr_expires_at_required")  # a rule across two fields, not a shape
    async with svc.db.transaction() as conn:
        row = await store.put_application(conn, zone_id, app_id, body.registration_method, body.expires_at)
    svc.auth.forget_identities()  # this process at once; the others on the NOTIFY of the change
    return store.application_projection(row)


@router.get("/zones/{zone_id}/applications/{app_id}", summary="Inspect an application")
async def get_application(zone_id: ZoneId, app_id: ItemId,
                          svc: ServicesDep) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM applications WHERE zone_id = %s AND id = %s", (zone_id, app_id),
                      store.application_projection, "application_not_found")


@router.post("/zones/{zone_id}/applications/{app_id}/archive", summary="Archive an application")
async def archive_application(zone_id: ZoneId, app_id: ItemId, svc: ServicesDep,
                              body: IgnoredBody = None) -> dict[str, Any]:
    answer = await _one(svc, """UPDATE applications SET archived_at = COALESCE(archived_at, now()), updated_at = now()
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, app_id),
                      store.application_projection, "application_not_found")
    svc.auth.forget_identities()
    return answer


@router.put("/zones/{zone_id}/resources/{resource_id}", summary="Create or update a resource")
async def put_resource(zone_id: ZoneId, resource_id: ItemId, body: Annotated[ResourceBody, BodyParam()],
                       svc: ServicesDep) -> dict[str, Any]:
    try:
        async with svc.db.transaction() as conn:
            row = await store.put_resource(conn, zone_id, resource_id, body.identifier, body.scopes)
    except pg_errors.UniqueViolation:
        raise CoordinatorError(409, "resource_identifier_taken") from None
    return store.resource_projection(row)


@router.get("/zones/{zone_id}/resources/{resource_id}", summary="Inspect a resource")
async def get_resource(zone_id: ZoneId, resource_id: ItemId,
                       svc: ServicesDep) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM resources WHERE zone_id = %s AND id = %s", (zone_id, resource_id),
                      store.resource_projection, "resource_not_found")


@router.post("/zones/{zone_id}/resources/{resource_id}/archive", summary="Archive a resource")
async def archive_resource(zone_id: ZoneId, resource_id: ItemId, svc: ServicesDep,
                           body: IgnoredBody = None) -> dict[str, Any]:
    return await _one(svc, """UPDATE resources SET archived_at = COALESCE(archived_at, now()), updated_at = now()
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, resource_id),
                      store.resource_projection, "resource_not_found")


@router.put("/zones/{zone_id}/authority-records/{record_id}", summary="Create or update an authority record")
async def put_authority_record(zone_id: ZoneId, record_id: ItemId,
                               body: Annotated[AuthorityRecordBody, BodyParam()], svc: ServicesDep) -> dict[str, Any]:
    async with svc.db.transaction() as conn:
        row = await store.put_authority_record(conn, zone_id, record_id, body.session_type, body.subject_id,
                                               body.expires_at)
    svc.auth.forget_identities()
    return store.authority_record_projection(row)


@router.get("/zones/{zone_id}/authority-records/{record_id}", summary="Inspect an authority record")
async def get_authority_record(zone_id: ZoneId, record_id: ItemId,
                               svc: ServicesDep) -> dict[str, Any]:
    return await _one(svc, "SELECT * FROM authority_records WHERE zone_id = %s AND id = %s", (zone_id, record_id),
                      store.authority_record_projection, "authority_record_not_found")


@router.post("/zones/{zone_id}/authority-records/{record_id}/revoke", summary="Revoke an authority record")
async def revoke_authority_record(zone_id: ZoneId, record_id: ItemId, svc: ServicesDep,
                                  body: IgnoredBody = None) -> dict[str, Any]:
    answer = await _one(svc, """UPDATE authority_records
                              SET status = 'revoked', revoked_at = COALESCE(revoked_at, now()),
                                  revoked_reason = COALESCE(revoked_reason, 'operator_revoked')
                              WHERE zone_id = %s AND id = %s RETURNING *""", (zone_id, record_id),
                      store.authority_record_projection, "authority_record_not_found")
    svc.auth.forget_identities()
    return answer
