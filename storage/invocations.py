"""Invocation transactions and projections (reference §4.14-4.17, §5.4).

Outbox keys are per transition: `invocation.<event>:<id>` for events that happen once, with the
attempt number appended for those a retry repeats (started, failed) — docs/DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from rules.errors import CoordinatorError
from rules.timefmt import iso_ms
from settings import Settings
from storage.db import Conn, Database, one, q1
from storage.idempotency import CreateResult, IdempotencyRequest, find_receipt, store_receipt
from rules import lifecycle
from rules import workflow_contract as wc
from storage.event_feed import INVOCATIONS_LIFECYCLE, Event
from storage.notices import invocation_notice, publish
from storage.pages import Page, list_page

INVOCATION_COLUMNS = """x.id, x.zone_id, x.service_id, x.source_session_id, x.target_session_id, x.method, x.status,
    x.attempts, x.max_attempts, x.timeout_ms, x.retry_policy_json, x.deadline_at, x.cancel_requested_at,
    x.started_at, x.completed_at, x.created_at, x.state_version"""

TERMINAL = lifecycle.INVOCATION_FINAL


@dataclass(frozen=True)
class CreateInvocation:
    """An invocation create after the API's request checks (reference §4.14)."""

    zone_id: str
    invocation_id: str
    service_id: str
    source_session_id: str | None
    target_session_id: str | None
    method: str
    params: Any
    metadata: dict[str, Any]
    timeout_ms: int
    retry_policy: dict[str, int]
    scope_id: str



def projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "service_id": row["service_id"],
            "source_session_id": row["source_session_id"], "target_session_id": row["target_session_id"],
            "method": row["method"], "status": row["status"], "attempts": row["attempts"],
            "max_attempts": row["max_attempts"], "timeout_ms": row["timeout_ms"],
            "retry_policy_json": row["retry_policy_json"], "deadline_at": iso_ms(row["deadline_at"]),
            "cancel_requested_at": iso_ms(row["cancel_requested_at"]), "started_at": iso_ms(row["started_at"]),
            "completed_at": iso_ms(row["completed_at"]), "created_at": iso_ms(row["created_at"])}


def list_projection(row: dict[str, Any]) -> dict[str, Any]:
    body = projection(row)
    for key in ("retry_policy_json", "cancel_requested_at"):
        del body[key]
    return body


@dataclass(frozen=True)
class InvocationFilter:
    """Which invocations of a zone a listing shows."""

    status: str | None = None
    service_id: str | None = None
    session_id: str | None = None  # the source or the target


async def list_invocations(db: Database, zone_id: str, where: InvocationFilter, limit: int,
                           cursor: str | None) -> Page:
    sql = f"SELECT {INVOCATION_COLUMNS} FROM agent_invocations x WHERE x.zone_id = %s"
    params: list[Any] = [zone_id]
    if where.status:
        sql, params = sql + " AND x.status = %s", params + [where.status]
    if where.service_id:
        sql, params = sql + " AND x.service_id = %s", params + [where.service_id]
    if where.session_id:
        sql += " AND (x.source_session_id = %s OR x.target_session_id = %s)"
        params += [where.session_id, where.session_id]
    return await list_page(db, table="agent_invocations", zone_id=zone_id, limit=limit, cursor=cursor, sql=sql,
                           params=params, project=list_projection)


async def get(conn: Conn, zone_id: str, invocation_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    return await q1(conn, f"""SELECT {INVOCATION_COLUMNS}, s.application_id AS service_application_id
                              FROM agent_invocations x JOIN agent_services s ON s.id = x.service_id
                              WHERE x.zone_id = %s AND x.id = %s{' FOR UPDATE OF x' if lock else ''}""",
                    (zone_id, invocation_id))


async def check_create(conn: Conn, zone_id: str, service_id: str, session_ids: list[str | None]) -> str:
    """Service and endpoint checks of §4.14; returns the source application S (for authz and scope)."""
    service = await q1(conn, "SELECT application_id FROM agent_services WHERE zone_id = %s AND id = %s FOR SHARE",
                       (zone_id, service_id))
    if service is None:
        raise CoordinatorError(404, "agent_service_not_found")
    apps: list[str] = []
    for session_id in session_ids:
        if session_id is None:
            apps.append("")
            continue
        row = await q1(conn, "SELECT application_id FROM sessions s "
                             f"WHERE s.zone_id = %s AND s.id = %s AND {lifecycle.invocation_live_sql('s')}",
                       (zone_id, session_id))
        if row is None:
            raise CoordinatorError(404, "session_not_found")
        apps.append(row["application_id"])
    return apps[0] or service["application_id"]


async def replay(conn: Conn, settings: Settings, req: IdempotencyRequest) -> CreateResult | None:
    receipt = await find_receipt(conn, settings, req)
    return None if receipt is None else CreateResult(receipt.response_status, receipt.response_json, replayed=True)


async def create(conn: Conn, settings: Settings, cmd: CreateInvocation, idem: IdempotencyRequest) -> CreateResult:
    await check_create(conn, cmd.zone_id, cmd.service_id, [cmd.source_session_id, cmd.target_session_id])
    replayed = await replay(conn, settings, idem)
    if replayed is not None:
        return replayed
    await conn.execute("""
        INSERT INTO agent_invocations (id, zone_id, service_id, source_session_id, target_session_id, idempotency_key,
            method, params_json, metadata_json, max_attempts, timeout_ms, retry_policy_json)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                       (cmd.invocation_id, cmd.zone_id, cmd.service_id, cmd.source_session_id, cmd.target_session_id,
                        cmd.invocation_id, cmd.method, Jsonb(cmd.params), Jsonb(cmd.metadata),
                        cmd.retry_policy["max_attempts"], cmd.timeout_ms, Jsonb(cmd.retry_policy)))
    row = one(await get(conn, cmd.zone_id, cmd.invocation_id))
    await _transitioned(conn, row, "invocation.created", wc.INVOCATION_CREATED,
                        f"created: {cmd.method} on service {cmd.service_id}, "
                        f"up to {row['max_attempts']} attempt(s) of {cmd.timeout_ms} ms")
    body = projection(row)
    await store_receipt(conn, settings, idem, resource_type="agent_invocation", resource_id=cmd.invocation_id,
                        status=201, body=body)
    return CreateResult(201, body)


async def _transitioned(conn: Conn, row: dict[str, Any], event: str, signal: str, summary: str) -> None:
    """The transition's event (attempt number in the key for those a retry repeats) and its
    workflow notice."""
    per_attempt = event in ("invocation.started", "invocation.failed")
    key = f"{event}:{row['id']}" + (f":{row['attempts']}" if per_attempt else "")
    await publish(conn, row["zone_id"], [Event(INVOCATIONS_LIFECYCLE, key, {
        "event": event, "zone_id": row["zone_id"], "service_id": row["service_id"], "invocation_id": row["id"]})],
        [invocation_notice(row, signal, summary)])


async def start(conn: Conn, zone_id: str, invocation_id: str) -> dict[str, Any]:
    row = await q1(conn, f"""
        UPDATE agent_invocations x SET status = 'running', attempts = x.attempts + 1, started_at = now(),
            completed_at = NULL, error_json = NULL, deadline_at = now() + make_interval(secs => x.timeout_ms / 1000.0),
            updated_at = now(), state_version = x.state_version + 1
        WHERE x.zone_id = %s AND x.id = %s AND x.status IN ('pending', 'failed') AND x.attempts < x.max_attempts
        RETURNING {INVOCATION_COLUMNS}""", (zone_id, invocation_id))
    if row is None:
        raise CoordinatorError(409, "invocation_not_startable")
    await _transitioned(conn, row, "invocation.started", wc.INVOCATION_STARTED,
                        f"attempt {row['attempts']}/{row['max_attempts']} started")
    return row


async def cancel(conn: Conn, zone_id: str, invocation_id: str, reason: str | None) -> dict[str, Any]:
    row = await q1(conn, f"""
        UPDATE agent_invocations x SET
            status = CASE WHEN x.status = 'pending' THEN 'canceled' ELSE 'cancel_requested' END,
            cancel_requested_at = now(),
            metadata_json = CASE WHEN %s::text IS NULL THEN x.metadata_json
                                 ELSE x.metadata_json || jsonb_build_object('cancel_reason', %s::text) END,
            updated_at = now(), state_version = x.state_version + 1
        WHERE x.zone_id = %s AND x.id = %s
          AND x.status NOT IN {lifecycle.INVOCATION_SETTLED_SQL}
        RETURNING {INVOCATION_COLUMNS}""", (reason, reason, zone_id, invocation_id))
    if row is None:
        raise CoordinatorError(409, "invocation_not_cancelable")
    why = f" ({reason})" if reason else ""
    if row["status"] == "canceled":
        await _transitioned(conn, row, "invocation.cancel_requested", wc.INVOCATION_COMPLETED,
                            f"canceled before it started{why}")
    else:
        await _transitioned(conn, row, "invocation.cancel_requested", wc.INVOCATION_CANCEL_REQUESTED,
                            f"cancel requested{why}")
    return row


async def complete(conn: Conn, zone_id: str, invocation_id: str, status: str, error: dict[str, Any] | None,
                   metadata: dict[str, Any]) -> dict[str, Any]:
    row = await q1(conn, f"""
        UPDATE agent_invocations x SET status = %s, error_json = %s, metadata_json = x.metadata_json || %s,
            completed_at = now(), updated_at = now(), state_version = x.state_version + 1
        WHERE x.zone_id = %s AND x.id = %s AND x.status IN ('running', 'cancel_requested')
        RETURNING {INVOCATION_COLUMNS}""",
                   (status, Jsonb(error) if error is not None else None, Jsonb(metadata), zone_id, invocation_id))
    if row is None:
        raise CoordinatorError(409, "invocation_not_completable")
    await _transitioned(conn, row, f"invocation.{status}", wc.INVOCATION_COMPLETED,
                        f"attempt {row['attempts']}/{row['max_attempts']} {status}")
    return row


async def settle_deadline(conn: Conn, zone_id: str, invocation_id: str) -> dict[str, Any] | None:
    """A running invocation past its deadline: failed while attempts remain, else timed_out."""
    row = await q1(conn, f"""
        UPDATE agent_invocations x SET
            status = CASE WHEN x.attempts < x.max_attempts THEN 'failed' ELSE 'timed_out' END,
            completed_at = now(), updated_at = now(), state_version = x.state_version + 1,
            error_json = COALESCE(x.error_json, '{{}}'::jsonb) || '{{"reason": "deadline_exceeded"}}'::jsonb
        WHERE x.zone_id = %s AND x.id = %s AND x.status = 'running' AND x.deadline_at <= now()
        RETURNING {INVOCATION_COLUMNS}""", (zone_id, invocation_id))
    if row is not None:
        await _transitioned(conn, row, f"invocation.{row['status']}", wc.INVOCATION_COMPLETED,
                            f"deadline exceeded: attempt {row['attempts']}/{row['max_attempts']} {row['status']}")
    return row
