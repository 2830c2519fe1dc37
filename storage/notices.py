"""The workflow outbox: what a command transaction tells the workflows (docs/DESIGN.md, "Who owns what").

Every storage function that changes a session's or an invocation's state calls `enqueue` in the
same transaction, with one notice per workflow that must hear of it. A notice carries the entity's
whole state at its `state_version` (the shapes of workflows/models.py, as JSON), so any one
delivery brings a workflow up to date and a stale or repeated one is a no-op. The dispatcher
(notices/) delivers the rows with signal-with-start: `start_args`, `search_attributes` and
`summary` start the workflow when it is not running.

A subtree suspend or resume writes its notices as one fan-out row instead (`fanout_sql`), which a
dispatcher spreads into the same rows (`spread_fanouts_sql`) before it claims.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from psycopg.types.json import Jsonb

from rules import lifecycle
from rules import workflow_contract as wc
from rules.timefmt import iso_ms
from storage.db import Conn, at_commit
from storage.event_feed import Event, emit
from storage.pages import iso_ms_sql

NOTIFY_CHANNEL = "workflow_outbox"


@dataclass(frozen=True)
class WorkflowNotice:
    workflow_id: str
    workflow_type: str
    signal: str
    payload: dict[str, Any]
    start_args: dict[str, Any]
    search_attributes: dict[str, str]
    summary: str


async def enqueue(conn: Conn, notices: list[WorkflowNotice]) -> None:
    """Insert the notices in order (one statement, however many) and wake the dispatchers at commit.

    The rows travel as one JSON document (json.dumps is C; psycopg's text-array dumping of
    thousands of escaped strings is not)."""
    if not notices:
        return
    await at_commit(
        conn,
        f"""
        WITH rows AS (
            INSERT INTO workflow_outbox (workflow_id, workflow_type, signal, payload, start_args,
                                         search_attributes, summary, due_at)
            SELECT n->>'workflow_id', n->>'workflow_type', n->>'signal', n->'payload', n->'start_args',
                   n->'search_attributes', n->>'summary', (n->>'due_at')::timestamptz
            FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(n, i)
            ORDER BY i
            RETURNING 1
        )
        SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM (SELECT count(*) FROM rows) c""",
        (Jsonb([{"workflow_id": n.workflow_id, "workflow_type": n.workflow_type, "signal": n.signal,
                 "payload": n.payload, "start_args": n.start_args, "search_attributes": n.search_attributes,
                 "summary": n.summary, "due_at": _due_at(n.payload)} for n in notices]),))


def _due_at(payload: dict[str, Any]) -> str | None:
    """The deadline the notice's workflow will arm a timer for (ISO), if any."""
    session = payload.get("session")
    if session is not None:
        return lifecycle.session_deadline(session["lifecycle"], session["status"], session["expires_at"],
                                          session["heartbeat_deadline_at"])[1]
    invocation = payload.get("invocation") or {}
    return lifecycle.invocation_deadline(invocation.get("status", ""), invocation.get("deadline_at"))


async def publish(conn: Conn, zone_id: str, events: list[Event], notices: list[WorkflowNotice]) -> None:
    """A change's events and workflow notices, written with the transaction's COMMIT (`at_commit`)."""
    await emit(conn, zone_id, events)
    await enqueue(conn, notices)


# ---------------------------------------------------------------------------------------- sessions

# The columns a session snapshot needs (every RETURNING of a session change lists at least these).
SNAPSHOT_COLUMNS = """s.id, s.zone_id, s.application_id, s.lifecycle, s.status, s.state_version, s.parent_id,
    s.root_id, s.started_at, s.ttl_seconds, s.heartbeat_deadline_at, s.lease_generation, s.termination_reason"""


def session_snapshot(row: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    """`SessionSnapshot` as JSON. `reason`: why it is suspended (termination_reason covers ends)."""
    return {
        "zone_id": row["zone_id"], "session_id": row["id"], "application_id": row["application_id"],
        "lifecycle": row["lifecycle"], "status": row["status"], "state_version": int(row["state_version"]),
        "parent_id": row["parent_id"], "root_id": row["root_id"],
        "expires_at": iso_ms(lifecycle.task_expires_at(row["lifecycle"], row["started_at"], row["ttl_seconds"])),
        "heartbeat_deadline_at": iso_ms(row["heartbeat_deadline_at"]),
        "lease_generation": int(row["lease_generation"] or 0),
        "reason": row.get("termination_reason") if row["status"] in lifecycle.SESSION_TERMINAL else reason,
    }


def session_notice(row: dict[str, Any], signal: str, summary: str, *, reason: str | None = None,
                   edge_id: str | None = None, peer_session_id: str | None = None) -> WorkflowNotice:
    """`SessionNotice` for the session in `row` (a SNAPSHOT_COLUMNS row)."""
    attrs = {wc.SA_ZONE: row["zone_id"], wc.SA_SESSION: row["id"], wc.SA_APPLICATION: row["application_id"],
             wc.SA_LIFECYCLE: row["lifecycle"], wc.SA_SESSION_STATUS: row["status"],
             wc.SA_ROOT: row["root_id"] or row["id"]}
    if row["parent_id"]:
        attrs[wc.SA_PARENT] = row["parent_id"]
    return WorkflowNotice(
        workflow_id=wc.session_workflow_id(row["zone_id"], row["id"]), workflow_type=wc.SESSION_WORKFLOW,
        signal=signal,
        payload={"session": session_snapshot(row, reason), "summary": summary, "edge_id": edge_id,
                 "peer_session_id": peer_session_id},
        start_args={"zone_id": row["zone_id"], "session_id": row["id"]},
        search_attributes=attrs,
        summary=f"{row['lifecycle']} session {row['id']} of {row['application_id']}")


def session_notices(rows: list[dict[str, Any]], signal: str, summary: str, reason: str | None = None
                    ) -> list[WorkflowNotice]:
    return [session_notice(r, signal, summary, reason=reason) for r in rows]


# The columns `enqueue` writes, in the order of `session_notice_sql`.
OUTBOX_COLUMNS = "workflow_id, workflow_type, signal, payload, start_args, search_attributes, summary, due_at"


def session_notice_sql(a: str, f: str) -> str:
    """`session_notice` (no edge, no peer) rendered by Postgres for the rows of alias `a` (with
    SNAPSHOT_COLUMNS) and the `signal`, `summary` and `reason` of alias `f`: the OUTBOX_COLUMNS of
    their workflow-outbox rows. Spreads a cascade's fan-out row (`fanout_sql`) into the notices of
    hundreds of sessions without the rows going to Python and back. tests/test_notice_sql.py holds
    it to `session_notice` and `enqueue`."""
    expires = lifecycle.task_expires_at_sql(a)
    snapshot = f"""jsonb_build_object(
        'zone_id', {a}.zone_id, 'session_id', {a}.id, 'application_id', {a}.application_id,
        'lifecycle', {a}.lifecycle, 'status', {a}.status, 'state_version', {a}.state_version,
        'parent_id', {a}.parent_id, 'root_id', {a}.root_id, 'expires_at', {iso_ms_sql(expires)},
        'heartbeat_deadline_at', {iso_ms_sql(f"{a}.heartbeat_deadline_at")},
        'lease_generation', COALESCE({a}.lease_generation, 0),
        'reason', CASE WHEN {a}.status IN {lifecycle.SESSION_TERMINAL_SQL} THEN {a}.termination_reason
                       ELSE {f}.reason END)"""
    attrs = f"""jsonb_build_object(
        '{wc.SA_ZONE}', {a}.zone_id, '{wc.SA_SESSION}', {a}.id, '{wc.SA_APPLICATION}', {a}.application_id,
        '{wc.SA_LIFECYCLE}', {a}.lifecycle, '{wc.SA_SESSION_STATUS}', {a}.status,
        '{wc.SA_ROOT}', COALESCE({a}.root_id, {a}.id))
        || CASE WHEN {a}.parent_id IS NOT NULL THEN jsonb_build_object('{wc.SA_PARENT}', {a}.parent_id)
                ELSE '{{}}'::jsonb END"""
    due = f"date_trunc('milliseconds', {lifecycle.session_deadline_sql(a)})"
    return f"""{wc.session_workflow_id_sql(f"{a}.zone_id", f"{a}.id")}, '{wc.SESSION_WORKFLOW}', {f}.signal,
        jsonb_build_object('session', {snapshot}, 'summary', {f}.summary, 'edge_id', NULL,
                           'peer_session_id', NULL),
        jsonb_build_object('zone_id', {a}.zone_id, 'session_id', {a}.id), {attrs},
        {a}.lifecycle || ' session ' || {a}.id || ' of ' || {a}.application_id, {due}"""


# SNAPSHOT_COLUMNS with their types: the attributes of `workflow_outbox_session` (migration 0008)
# after its `outbox_seq`, as a fan-out row keeps a session.
SNAPSHOT_TYPES = {"id": "text", "zone_id": "text", "application_id": "text", "lifecycle": "text", "status": "text",
                  "state_version": "bigint", "parent_id": "text", "root_id": "text", "started_at": "timestamptz",
                  "ttl_seconds": "integer", "heartbeat_deadline_at": "timestamptz", "lease_generation": "integer",
                  "termination_reason": "text"}
assert list(SNAPSHOT_TYPES) == [c.strip().removeprefix("s.") for c in SNAPSHOT_COLUMNS.split(",")]


def fanout_sql(changed: str, order: str) -> str:
    """An INSERT of the one `workflow_outbox_fanout` row (migration 0008) that stands for the
    notices of the sessions of CTE `changed` (SNAPSHOT_COLUMNS), in `order` (over alias `c`),
    RETURNING 1; no row when `changed` is empty. Each session draws its outbox `seq` here, so its
    notice keeps its place among its workflow's rows. Takes %(signal)s, %(summary)s, %(reason)s.

    One row holding a binary array costs a 200-session cascade one to two milliseconds where 201
    rendered outbox rows cost four to six; `spread_fanouts_sql` renders them off the request path."""
    columns = ", ".join(f"c.{name}" for name in SNAPSHOT_TYPES)
    fields = ", ".join(f"x.{name}" for name in ["outbox_seq", *SNAPSHOT_TYPES])
    return f"""INSERT INTO workflow_outbox_fanout (seq, signal, summary, reason, sessions)
            SELECT min(x.outbox_seq), %(signal)s::text, %(summary)s::text, %(reason)s::text,
                   array_agg(ROW({fields})::workflow_outbox_session ORDER BY x.outbox_seq)
            FROM (SELECT nextval('workflow_outbox_seq_seq') AS outbox_seq, {columns}
                  FROM {changed} c ORDER BY {order}) x
            HAVING count(*) > 0
            RETURNING 1"""


def spread_fanouts_sql() -> str:
    """Spread up to %(limit)s fan-out rows of task queue %(queue)s (or of none) into their
    workflow-outbox rows, in one statement: `session_notice_sql` for each session, with the `seq`
    it drew. Rows another transaction holds are skipped. Selects `n`, the outbox rows written."""
    return f"""
        WITH taken AS (
            DELETE FROM workflow_outbox_fanout
            WHERE seq IN (SELECT seq FROM workflow_outbox_fanout WHERE task_queue IN ('', %(queue)s)
                          ORDER BY seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
            RETURNING *
        ), spread AS (
            INSERT INTO workflow_outbox (seq, {OUTBOX_COLUMNS}, task_queue, created_at)
            SELECT c.outbox_seq, {session_notice_sql("c", "f")}, f.task_queue, f.created_at
            FROM taken f CROSS JOIN LATERAL unnest(f.sessions) c
            RETURNING 1
        )
        SELECT count(*) AS n FROM spread"""


def notify_sql(inserted_cte: str) -> str:
    """A scalar subquery that wakes the dispatchers when the CTE `inserted_cte` (an INSERT INTO
    workflow_outbox ... RETURNING) wrote a row."""
    return f"(SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM (SELECT 1 FROM {inserted_cte} LIMIT 1) x)"


# ------------------------------------------------------------------------------------- invocations

SNAPSHOT_INVOCATION_COLUMNS = """x.id, x.zone_id, x.service_id, x.method, x.status, x.attempts, x.max_attempts,
    x.state_version, x.deadline_at, x.source_session_id"""


def invocation_snapshot(row: dict[str, Any]) -> dict[str, Any]:
    return {"zone_id": row["zone_id"], "invocation_id": row["id"], "service_id": row["service_id"],
            "method": row["method"], "status": row["status"], "attempts": int(row["attempts"]),
            "max_attempts": int(row["max_attempts"]), "state_version": int(row["state_version"]),
            "deadline_at": iso_ms(row["deadline_at"]), "source_session_id": row["source_session_id"]}


def invocation_notice(row: dict[str, Any], signal: str, summary: str) -> WorkflowNotice:
    attrs = {wc.SA_ZONE: row["zone_id"], wc.SA_INVOCATION: row["id"], wc.SA_SERVICE: row["service_id"],
             wc.SA_INVOCATION_STATUS: row["status"]}
    if row["source_session_id"]:
        attrs[wc.SA_SESSION] = row["source_session_id"]
    return WorkflowNotice(
        workflow_id=wc.invocation_workflow_id(row["zone_id"], row["id"]), workflow_type=wc.INVOCATION_WORKFLOW,
        signal=signal, payload={"invocation": invocation_snapshot(row), "summary": summary},
        start_args={"zone_id": row["zone_id"], "invocation_id": row["id"]},
        search_attributes=attrs, summary=f"invocation {row['method']} {row['id']} on service {row['service_id']}")
