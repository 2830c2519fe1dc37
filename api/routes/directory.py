"""Directory routes (operator token only): applications, resources and authority records."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import ServicesDep, operator
from api.routes.common import Body, IgnoredBody, ItemId, NonEmpty, ZoneId, make_router
from rules.timefmt import parse_iso_z
from commands import directory as commands

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


def _identities_changed(svc: ServicesDep, answer: dict[str, Any]) -> dict[str, Any]:
    """After a change that can end identities: this process forgets them at once, the others on
    the NOTIFY of the change."""
    svc.auth.forget_identities()
    return answer


@router.put("/zones/{zone_id}/applications/{app_id}", summary="Create or update an application")
async def put_application(zone_id: ZoneId, app_id: ItemId, body: Annotated[ApplicationBody, BodyParam()],
                          svc: ServicesDep) -> dict[str, Any]:
    answer = await commands.put_application(svc.db, zone_id, app_id, body.registration_method, body.expires_at)
    return _identities_changed(svc, answer)


@router.get("/zones/{zone_id}/applications/{app_id}", summary="Inspect an application")
async def get_application(zone_id: ZoneId, app_id: ItemId, svc: ServicesDep) -> dict[str, Any]:
    return await commands.get(svc.db, "application", zone_id, app_id)


@router.post("/zones/{zone_id}/applications/{app_id}/archive", summary="Archive an application")
async def archive_application(zone_id: ZoneId, app_id: ItemId, svc: ServicesDep,
                              body: IgnoredBody = None) -> dict[str, Any]:
    return _identities_changed(svc, await commands.archive(svc.db, "application", zone_id, app_id))


@router.put("/zones/{zone_id}/resources/{resource_id}", summary="Create or update a resource")
async def put_resource(zone_id: ZoneId, resource_id: ItemId, body: Annotated[ResourceBody, BodyParam()],
                       svc: ServicesDep) -> dict[str, Any]:
    return await commands.put_resource(svc.db, zone_id, resource_id, body.identifier, body.scopes)


@router.get("/zones/{zone_id}/resources/{resource_id}", summary="Inspect a resource")
async def get_resource(zone_id: ZoneId, resource_id: ItemId, svc: ServicesDep) -> dict[str, Any]:
    return await commands.get(svc.db, "resource", zone_id, resource_id)


@router.post("/zones/{zone_id}/resources/{resource_id}/archive", summary="Archive a resource")
async def archive_resource(zone_id: ZoneId, resource_id: ItemId, svc: ServicesDep,
                           body: IgnoredBody = None) -> dict[str, Any]:
    return await commands.archive(svc.db, "resource", zone_id, resource_id)


@router.put("/zones/{zone_id}/authority-records/{record_id}", summary="Create or update an authority record")
async def put_authority_record(zone_id: ZoneId, record_id: ItemId,
                               body: Annotated[AuthorityRecordBody, BodyParam()], svc: ServicesDep) -> dict[str, Any]:
    answer = await commands.put_authority_record(svc.db, zone_id, record_id, body.session_type, body.subject_id,
                                                 body.expires_at)
    return _identities_changed(svc, answer)


@router.get("/zones/{zone_id}/authority-records/{record_id}", summary="Inspect an authority record")
async def get_authority_record(zone_id: ZoneId, record_id: ItemId, svc: ServicesDep) -> dict[str, Any]:
    return await commands.get(svc.db, "authority_record", zone_id, record_id)


@router.post("/zones/{zone_id}/authority-records/{record_id}/revoke", summary="Revoke an authority record")
async def revoke_authority_record(zone_id: ZoneId, record_id: ItemId, svc: ServicesDep,
                                  body: IgnoredBody = None) -> dict[str, Any]:
    return _identities_changed(svc, await commands.revoke_authority_record(svc.db, zone_id, record_id))
