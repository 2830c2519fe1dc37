"""Directory rows (applications, resources, authority records): ours to keep (docs/DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rules.timefmt import iso_ms
from storage.db import Conn, Database, one, q1


async def ensure_zone(conn: Conn, zone_id: str) -> None:
    await conn.execute("INSERT INTO zones (id) VALUES (%s) ON CONFLICT DO NOTHING", (zone_id,))


def application_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "registration_method": row["registration_method"],
            "expires_at": iso_ms(row["expires_at"]), "archived_at": iso_ms(row["archived_at"]),
            "created_at": iso_ms(row["created_at"]), "updated_at": iso_ms(row["updated_at"])}


def resource_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "identifier": row["identifier"],
            "scopes": list(row["scopes"]), "archived_at": iso_ms(row["archived_at"]),
            "created_at": iso_ms(row["created_at"]), "updated_at": iso_ms(row["updated_at"])}


def authority_record_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "session_type": row["session_type"],
            "subject_id": row["subject_id"], "status": row["status"], "expires_at": iso_ms(row["expires_at"]),
            "created_at": iso_ms(row["created_at"]), "revoked_at": iso_ms(row["revoked_at"]),
            "revoked_reason": row["revoked_reason"]}


async def put_application(conn: Conn, zone_id: str, app_id: str, registration_method: str,
                          expires_at: datetime | None) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO applications (zone_id, id, registration_method, expires_at) VALUES (%s, %s, %s, %s)
        ON CONFLICT (zone_id, id) DO UPDATE SET registration_method = EXCLUDED.registration_method,
            expires_at = EXCLUDED.expires_at, archived_at = NULL, updated_at = now()
        RETURNING *""", (zone_id, app_id, registration_method, expires_at)))


async def put_resource(conn: Conn, zone_id: str, resource_id: str, identifier: str,
                       scopes: list[str]) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO resources (zone_id, id, identifier, scopes) VALUES (%s, %s, %s, %s)
        ON CONFLICT (zone_id, id) DO UPDATE SET identifier = EXCLUDED.identifier, scopes = EXCLUDED.scopes,
            archived_at = NULL, updated_at = now()
        RETURNING *""", (zone_id, resource_id, identifier, scopes)))


async def put_authority_record(conn: Conn, zone_id: str, record_id: str, session_type: str, subject_id: str,
                               expires_at: datetime) -> dict[str, Any]:
    await ensure_zone(conn, zone_id)
    return one(await q1(conn, """
        INSERT INTO authority_records (zone_id, id, session_type, subject_id, expires_at, authenticated_at)
        VALUES (%s, %s, %s, %s, %s, now())
        ON CONFLICT (zone_id, id) DO UPDATE SET session_type = EXCLUDED.session_type,
            subject_id = EXCLUDED.subject_id, expires_at = EXCLUDED.expires_at, status = 'active',
            revoked_at = NULL, revoked_reason = NULL
        RETURNING *""", (zone_id, record_id, session_type, subject_id, expires_at)))


# Each directory kind: its table, its projection, the error a missing row answers.
_KINDS: dict[str, tuple[str, Any, str]] = {
    "application": ("applications", application_projection, "application_not_found"),
    "resource": ("resources", resource_projection, "resource_not_found"),
    "authority_record": ("authority_records", authority_record_projection, "authority_record_not_found"),
}


async def _one(db: Database, kind: str, sql: str, zone_id: str, item_id: str) -> dict[str, Any] | None:
    table, project, _ = _KINDS[kind]
    async with db.connection() as conn:
        row = await q1(conn, sql.format(table=table), (zone_id, item_id))
    return None if row is None else project(row)


async def get_item(db: Database, kind: str, zone_id: str, item_id: str) -> dict[str, Any] | None:
    """The projection of a directory row of `kind`, or None."""
    return await _one(db, kind, "SELECT * FROM {table} WHERE zone_id = %s AND id = %s", zone_id, item_id)


async def archive_item(db: Database, kind: str, zone_id: str, item_id: str) -> dict[str, Any] | None:
    """Archive an application or a resource (once: a second archive keeps the first time)."""
    return await _one(db, kind, """UPDATE {table} SET archived_at = COALESCE(archived_at, now()), updated_at = now()
                                   WHERE zone_id = %s AND id = %s RETURNING *""", zone_id, item_id)


async def revoke_authority_record(db: Database, zone_id: str, record_id: str) -> dict[str, Any] | None:
    return await _one(db, "authority_record", """UPDATE {table}
                          SET status = 'revoked', revoked_at = COALESCE(revoked_at, now()),
                              revoked_reason = COALESCE(revoked_reason, 'operator_revoked')
                          WHERE zone_id = %s AND id = %s RETURNING *""", zone_id, record_id)


def missing_code(kind: str) -> str:
    return _KINDS[kind][2]


# One round trip for both runtime identity checks (§3.1 step 11): until when the application and the
# authority record stay live (epoch seconds; NULL when not live now). A NULL sid skips the record.
_IDENTITY_SQL = """
SELECT
  (SELECT COALESCE(EXTRACT(EPOCH FROM expires_at)::float8, 'Infinity'::float8) FROM applications
    WHERE zone_id = %(zone_id)s AND id = %(client_id)s
      AND archived_at IS NULL AND (expires_at IS NULL OR expires_at > now())) AS application_until,
  CASE WHEN %(sid)s::text IS NULL THEN 'Infinity'::float8 ELSE
  (SELECT EXTRACT(EPOCH FROM expires_at)::float8 FROM authority_records
    WHERE zone_id = %(zone_id)s AND id = %(sid)s::text
      AND status = 'active' AND expires_at > now()) END AS authority_record_until
"""


async def identity_live_until(db: Database, zone_id: str, client_id: str, sid: str | None) -> dict[str, Any] | None:
    """`application_until` and `authority_record_until` of a caller's identity (see `_IDENTITY_SQL`)."""
    return await db.fetchrow(_IDENTITY_SQL, {"zone_id": zone_id, "client_id": client_id, "sid": sid})
