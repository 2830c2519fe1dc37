"""Directory commands (operator token): applications, resources and authority records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import errors as pg_errors

from rules.errors import CoordinatorError
from storage import directory as store
from storage.db import Database


def _found(kind: str, body: dict[str, Any] | None) -> dict[str, Any]:
    if body is None:
        raise CoordinatorError(404, store.missing_code(kind))
    return body


async def get(db: Database, kind: str, zone_id: str, item_id: str) -> dict[str, Any]:
    return _found(kind, await store.get_item(db, kind, zone_id, item_id))


async def archive(db: Database, kind: str, zone_id: str, item_id: str) -> dict[str, Any]:
    return _found(kind, await store.archive_item(db, kind, zone_id, item_id))


async def revoke_authority_record(db: Database, zone_id: str, record_id: str) -> dict[str, Any]:
    return _found("authority_record", await store.revoke_authority_record(db, zone_id, record_id))


async def put_application(db: Database, zone_id: str, app_id: str, registration_method: str,
                          expires_at: datetime | None) -> dict[str, Any]:
    if registration_method == "dcr" and expires_at is None:
        raise CoordinatorError(400, "dcr_expires_at_required")  # a rule across two fields, not a shape
    async with db.transaction() as conn:
        row = await store.put_application(conn, zone_id, app_id, registration_method, expires_at)
    return store.application_projection(row)


async def put_resource(db: Database, zone_id: str, resource_id: str, identifier: str,
                       scopes: list[str]) -> dict[str, Any]:
    try:
        async with db.transaction() as conn:
            row = await store.put_resource(conn, zone_id, resource_id, identifier, scopes)
    except pg_errors.UniqueViolation:
        raise CoordinatorError(409, "resource_identifier_taken") from None
    return store.resource_projection(row)


async def put_authority_record(db: Database, zone_id: str, record_id: str, session_type: str, subject_id: str,
                               expires_at: datetime) -> dict[str, Any]:
    async with db.transaction() as conn:
        row = await store.put_authority_record(conn, zone_id, record_id, session_type, subject_id, expires_at)
    return store.authority_record_projection(row)
