"""Session transactions and projections (reference §4.4-4.10, §5.1-5.3).

Every function that changes state takes a connection already inside a transaction and writes, in
that same transaction, its outbox events and one workflow-outbox notice per session it changed
(storage/notices.py): the command's answer never waits on Temporal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from rules.errors import CoordinatorError
from rules.ids import new_id
from rules.timefmt import iso_ms
from settings import Settings
from storage import history
from storage.db import XACT_LOCK_SQL, Conn, Database, Refused, at_commit, one, q, q1, q_batch, refuse_sql
from storage.pages import body_columns, iso_ms_sql, json_page
from storage.idempotency import CreateResult, IdempotencyRequest, find_receipt, inactive_result, store_receipt
from rules import lifecycle
from rules import workflow_contract as wc
from storage.event_feed import AGENTS_LIFECYCLE, DELEGATIONS_INVALIDATE, NEW_ID_SQL, SESSIONS_REVOKE, Event, bump_epoch
from storage.notices import (
    SNAPSHOT_COLUMNS, WorkflowNotice, enqueue, fanout_sql, notify_sql, publish, session_notice, session_notices,
)


CAPACITY_LIVE_SQL = lifecycle.capacity_live_sql("s")

SESSION_COLUMNS = """s.id, s.zone_id, s.application_id, s.parent_id, s.root_id, s.subject_authority_record_id,
    s.lifecycle, s.labels, s.status, s.depth, s.ttl_seconds, s.metadata_json, s.started_at, s.terminated_at,
    s.termination_reason, s.last_active_at, s.last_heartbeat_at, s.heartbeat_deadline_at, s.lease_generation,
    s.state_version, s.child_count, s.max_children"""

# The session body of the read routes (reference §4.6: GET, list, children), as (key, SQL over alias
# `x`). Postgres renders it as JSON text that the API sends as it is: a list of 100 decoded and
# projected in Python cost about 1.7 ms of API CPU, rendered here 0.2 ms plus 0.4 ms in Postgres.
_SESSION_BODY_FIELDS = (
    ("agent_session_id", "x.id"),
    ("zone_id", "x.zone_id"),
    ("application_id", "x.application_id"),
    ("parent_id", "x.parent_id"),
    ("subject_authority_record_id", "x.subject_authority_record_id"),
    ("lifecycle", "x.lifecycle"),
    ("labels", "COALESCE(x.labels, '{}')"),
    ("status", "x.status"),
    ("depth", "x.depth"),
    ("ttl_seconds", "x.ttl_seconds"),
    ("metadata", "x.metadata_json"),
    ("started_at", iso_ms_sql("x.started_at")),
    ("terminated_at", iso_ms_sql("x.terminated_at")),
    ("termination_reason", "x.termination_reason"),
    ("last_heartbeat_at", iso_ms_sql("x.last_heartbeat_at")),
    ("heartbeat_deadline_at", iso_ms_sql("x.heartbeat_deadline_at")),
    ("lease_generation", "x.lease_generation"),
)
SESSION_BODY = body_columns(_SESSION_BODY_FIELDS)
# A child in `GET .../children` has no termination fields (reference §4.8).
CHILD_BODY = body_columns(f for f in _SESSION_BODY_FIELDS if f[0] not in ("terminated_at", "termination_reason"))


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions of a zone a listing shows."""

    status: str | None = None
    lifecycle: str | None = None
    application_id: str | None = None
    label: str | None = None  # sessions carrying this label


async def list_sessions(db: Database, zone_id: str, where: SessionFilter, limit: int, cursor: str | None) -> bytes:
    """A page of the zone's sessions (`SESSION_BODY`s) as JSON bytes."""
    sql = "FROM sessions x WHERE x.zone_id = %s"
    params: list[Any] = [zone_id]
    for column in ("status", "lifecycle", "application_id"):
        value = getattr(where, column)
        if value is not None:
            sql += f" AND x.{column} = %s"
            params.append(value)
    if where.label is not None:
        sql += " AND %s = ANY(x.labels)"
        params.append(where.label)
    return await json_page(db, table="sessions", zone_id=zone_id, limit=limit, cursor=cursor, body=SESSION_BODY,
                           id_key="agent_session_id", sql_from=sql, params=params)


async def list_children(db: Database, zone_id: str, session_id: str, limit: int, cursor: str | None) -> bytes:
    """A page of a session's children (`CHILD_BODY`s) as JSON bytes."""
    return await json_page(
        db, table="sessions", zone_id=zone_id, limit=limit, cursor=cursor, body=CHILD_BODY,
        id_key="agent_session_id",
        sql_from="FROM agent_topology t JOIN sessions x ON x.id = t.child_id WHERE t.parent_id = %s AND x.zone_id = %s",
        params=[session_id, zone_id])


async def session_body(db: Database, zone_id: str, session_id: str) -> str | None:
    """The session's body (`SESSION_BODY`) as JSON text, or None when the zone has no such session."""
    return await db.fetchval(f"SELECT row_to_json(b)::text FROM (SELECT {SESSION_BODY} FROM sessions x "
                             "WHERE x.zone_id = %s AND x.id = %s) b", (zone_id, session_id))


async def session_body_at(db: Database, zone_id: str, session_id: str, at: datetime) -> dict[str, Any] | None:
    """The session's body as of `at`: its status then (and its end, if it had ended by then), with
    the status changes recorded up to then (storage/history.py). None: no such session then."""
    async with db.connection() as conn:
        body = await q1(conn, f"SELECT row_to_json(b) AS body FROM (SELECT {SESSION_BODY} FROM sessions x "
                              "WHERE x.zone_id = %s AND x.id = %s) b", (zone_id, session_id))
        changes = await history.entity_history(conn, "session", session_id, at)
    if body is None or not changes:
        return None
    then = dict(body["body"], status=changes[-1]["status"], as_of=iso_ms(at))
    if then["status"] not in lifecycle.SESSION_TERMINAL:
        then.update(terminated_at=None, termination_reason=None)
    then["status_history"] = [{"status": c["status"], "changed_at": iso_ms(c["changed_at"]), "actor": c["actor"],
                               "reason": c["reason"]} for c in changes]
    return then


def start_projection(row: dict[str, Any], delegation_edge_id: str | None) -> dict[str, Any]:
    return {
        "agent_session_id": row["id"],
        "zone_id": row["zone_id"],
        "application_id": row["application_id"],
        "parent_id": row["parent_id"],
        "subject_authority_record_id": row["subject_authority_record_id"],
        "lifecycle": row["lifecycle"],
        "labels": list(row["labels"] or []),
        "status": row["status"],
        "depth": row["depth"],
        "ttl_seconds": row["ttl_seconds"],
        "started_at": iso_ms(row["started_at"]),
        "last_heartbeat_at": iso_ms(row["last_heartbeat_at"]),
        "heartbeat_deadline_at": iso_ms(row["heartbeat_deadline_at"]),
        "delegation_edge_id": delegation_edge_id,
        "lease_generation": row["lease_generation"],
    }


async def get_session(conn: Conn, zone_id: str, session_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    return await q1(conn, f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.zone_id = %s AND s.id = %s"
                          f"{' FOR UPDATE' if lock else ''}", (zone_id, session_id))


@dataclass(frozen=True)
class StartSession:
    """A session start after its request checks (reference §4.4 steps 1-4, commands/sessions.py)."""

    zone_id: str
    session_id: str
    application_id: str
    authority_record_id: str
    parent_id: str | None
    lifecycle: str
    labels: list[str]
    ttl_seconds: int | None
    parent_authority: str
    inherit_parent_edge_id: str | None
    metadata: dict[str, Any]
    # The caller's right to start a child under a session of another application (the command's
    # authorization rule, asked here because the parent row is read under the capacity lock).
    may_spawn_under: Callable[[str], bool]


# ----------------------------------------------------------------------------------------------
# start


async def replay_start(conn: Conn, settings: Settings, req: IdempotencyRequest, zone_id: str,
                       application_id: str) -> CreateResult | None:
    """Answer a repeated start from its receipt (reference §4.4 step 5), None when the key is new."""
    receipt = await find_receipt(conn, settings, req)
    if receipt is None:
        return None
    live = await q1(conn, f"""SELECT 1 FROM sessions s WHERE s.zone_id = %(zone)s AND s.id = %(id)s
                              AND s.application_id = %(app)s AND {CAPACITY_LIVE_SQL}""",
                    {"zone": zone_id, "id": receipt.resource_id, "app": application_id})
    if live is None:
        raise inactive_result()
    return CreateResult(receipt.response_status, receipt.response_json, replayed=True)


# The session row a start inserts, from `source` (its counts as `c`) where `condition` holds.
_INSERT_SESSION_SQL = """
        INSERT INTO sessions AS s (id, zone_id, application_id, parent_id, root_id, subject_authority_record_id,
            status, depth, labels, max_children, ttl_seconds, metadata_json, lifecycle,
            last_heartbeat_at, heartbeat_deadline_at, lease_generation)
        SELECT %(id)s::text, %(zone)s::text, %(app)s::text, %(parent)s::text, %(root)s::text, %(ar)s::text,
            'active', %(depth)s::int, %(labels)s::text[], %(max_children)s::int, %(ttl)s::int, %(metadata)s::jsonb,
            %(lifecycle)s::text,
            CASE WHEN %(service)s THEN now() END,
            CASE WHEN %(service)s THEN now() + make_interval(secs => %(lease)s) END,
            CASE WHEN %(service)s THEN 1 ELSE 0 END
        FROM {source}
        WHERE {condition}"""

# A zone's capacity-live counts (an upper bound: see CAPACITY_LIVE_SQL for the exact one).
_LIVE_COUNTS_SQL = """SELECT COALESCE(sum(live), 0) AS zone_n,
                             COALESCE(sum(live) FILTER (WHERE application_id = %(app)s), 0) AS app_n
                      FROM session_capacity WHERE zone_id = %(zone)s"""

_START_CONDITION = """%(insert)s AND c.registration_method IS NOT NULL AND c.record_live
          AND (c.registration_method <> 'dcr' OR (%(lifecycle)s = 'task' AND %(parent)s::text IS NULL))
          AND (%(capacity_counted)s OR (c.zone_n < %(max_zone)s AND c.app_n < %(max_app)s
                                        AND (c.registration_method <> 'dcr' OR c.app_n = 0)))"""

# The checks of a session start (application, authority record, upper-bound capacity counts, and
# the transaction's now()) and, when `insert` is set and they pass, the insert itself: one
# statement, so a root start near a limit needs no second round trip under the capacity lock.
# `start_session` reads the checks in the reference's order to answer a refusal; the condition
# (`_START_CONDITION`) lets through only what those checks let through (`capacity_counted`: the
# exact count near a limit was taken instead).
_START_SQL = f"""
    WITH checks AS MATERIALIZED (
        SELECT app.registration_method, record.live AS record_live, live.zone_n, live.app_n, now() AS tx_now
        FROM (SELECT 1) one
        LEFT JOIN LATERAL (SELECT registration_method FROM applications
                           WHERE zone_id = %(zone)s AND id = %(app)s AND archived_at IS NULL
                             AND (expires_at IS NULL OR expires_at > now())) app ON true
        LEFT JOIN LATERAL (SELECT true AS live FROM authority_records
                           WHERE zone_id = %(zone)s AND id = %(record)s AND status = 'active'
                             AND expires_at > now()) record ON true
        CROSS JOIN LATERAL ({_LIVE_COUNTS_SQL}) live
    ), inserted AS ({_INSERT_SESSION_SQL.format(source="checks c", condition=_START_CONDITION)}
        RETURNING {SESSION_COLUMNS}
    )
    SELECT c.*, s.* FROM checks c LEFT JOIN inserted s ON true"""

# A root start checked before the capacity lock: inserted with the COMMIT, under the lock (taken by
# the statement before), if the counts still leave room; else the transaction is refused and the
# start runs again the locked way (`start`).
CAPACITY_CHANGED = "session_capacity_changed"
_GUARDED_START_SQL = _INSERT_SESSION_SQL.format(source=f"({_LIVE_COUNTS_SQL}) c", condition=f"""
        CASE WHEN c.zone_n < %(max_zone)s AND c.app_n < %(max_app)s AND (NOT %(dcr)s OR c.app_n = 0) THEN true
             ELSE {refuse_sql(CAPACITY_CHANGED)} END""")


def _check_application_and_record(found: dict[str, Any], cmd: StartSession) -> None:
    """Steps 5-7 of reference §4.4 on the columns of `_START_SQL`'s checks."""
    if found["registration_method"] is None:
        raise CoordinatorError(404, "application_not_found")
    dcr = found["registration_method"] == "dcr"
    if dcr and cmd.lifecycle != "task":
        raise CoordinatorError(409, "dcr_application_cannot_host_service")
    if dcr and cmd.parent_id:
        raise CoordinatorError(409, "dcr_application_cannot_be_child")
    if not found["record_live"]:
        raise CoordinatorError(404, "session_not_found",
                               detail="subject authority record is not active in this zone")


async def start(db: Database, settings: Settings, cmd: StartSession, idempotency: IdempotencyRequest | None,
                before_commit: Callable[[Conn, CreateResult], Awaitable[None]] | None = None) -> CreateResult:
    """A session start as one transaction (`start_session`). A root start checks its zone's capacity
    before taking the lock and inserts with the COMMIT; if the zone filled up in between, it runs
    again, counting under the lock."""
    try:
        return await db.run(lambda conn: start_session(conn, settings, cmd, idempotency), before_commit=before_commit)
    except Refused as refused:
        if refused.code != CAPACITY_CHANGED:
            raise
    return await db.run(lambda conn: start_session(conn, settings, cmd, idempotency, lock_first=True),
                        before_commit=before_commit)


async def start_session(conn: Conn, settings: Settings, cmd: StartSession,
                        idempotency: IdempotencyRequest | None, *, lock_first: bool = False) -> CreateResult:
    """Steps 5-15 of reference §4.4 in one transaction. Run it with `start`: a root start not near a
    limit (unless `lock_first`) takes the capacity lock with its COMMIT, and a refusal there
    (`Refused(CAPACITY_CHANGED)`) means: run again with `lock_first`."""
    if idempotency is not None:
        replay = await replay_start(conn, settings, idempotency, cmd.zone_id, cmd.application_id)
        if replay is not None:
            return replay

    # Capacity lock: serialises the starts of one zone from counting to commit (not over the whole
    # request as in the reference). It is taken by its own statement: a statement's snapshot is
    # taken when it begins, so counts read by the statement that waited for the lock would miss the
    # starts committed while it waited. A root start not near a limit takes it with its COMMIT
    # (`_start_root_at_commit`), so it is held only while Postgres runs the last statements; a
    # child, or a root near a limit, takes it first (`_start_locked`).
    params = {"lock_key": f"coordinator:session_capacity:{cmd.zone_id}", "zone": cmd.zone_id,
              "app": cmd.application_id, "record": cmd.authority_record_id, "id": cmd.session_id,
              "parent": cmd.parent_id or None, "root": cmd.session_id, "depth": 0, "labels": cmd.labels,
              "ar": cmd.authority_record_id, "max_children": settings.MAX_CHILDREN, "ttl": cmd.ttl_seconds,
              "metadata": Jsonb(cmd.metadata), "lifecycle": cmd.lifecycle, "service": cmd.lifecycle == "service",
              "lease": settings.SERVICE_AGENT_LEASE_SECONDS, "max_zone": settings.MAX_AGENTS_PER_ZONE,
              "max_app": settings.MAX_AGENTS_PER_APP, "insert": not cmd.parent_id, "capacity_counted": False}
    row = None if lock_first or cmd.parent_id else await _start_root_at_commit(conn, settings, cmd, params)
    parent = None
    if row is None:
        row, parent = await _start_locked(conn, settings, cmd, params)

    events: list[Event] = []
    edge_id = None
    if parent is not None:
        await conn.execute("INSERT INTO agent_topology (parent_id, child_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                           (parent["id"], cmd.session_id))
        await conn.execute("UPDATE sessions SET child_count = child_count + 1, updated_at = now() WHERE id = %s",
                           (parent["id"],))
        if cmd.parent_authority == "inherit":
            edge_id = await _inherit_parent_edge(conn, cmd, events)

    events.append(Event(AGENTS_LIFECYCLE, f"spawn:{cmd.session_id}", {
        "event": "spawn", "zone_id": cmd.zone_id, "agent_session_id": cmd.session_id,
        "parent_id": cmd.parent_id or None, "application_id": cmd.application_id}))
    summary = f"created {cmd.lifecycle} session of {cmd.application_id}" + (
        f" under {cmd.parent_id}" if cmd.parent_id else "") + (f", inheriting edge {edge_id}" if edge_id else "")
    notices = [session_notice(row, wc.SESSION_CREATED, summary, edge_id=edge_id, peer_session_id=cmd.parent_id)]
    if edge_id is not None and parent is not None:  # an inherited edge: the child has a parent
        notices.append(session_notice(parent, wc.DELEGATION_GIVEN,
                                      f"edge {edge_id} inherited by child {cmd.session_id}",
                                      edge_id=edge_id, peer_session_id=cmd.session_id))
    await publish(conn, cmd.zone_id, events, notices)

    body = start_projection(row, edge_id)
    if idempotency is not None:
        await store_receipt(conn, settings, idempotency, resource_type="session", resource_id=cmd.session_id,
                            status=201, body=body)
    return CreateResult(201, body)


def _near_a_limit(found: dict[str, Any], settings: Settings) -> bool:
    """Whether `_START_SQL`'s upper-bound counts reach a limit (a DCR application may hold one
    session): then only the exact count, under the capacity lock, may decide."""
    return (found["zone_n"] >= settings.MAX_AGENTS_PER_ZONE or found["app_n"] >= settings.MAX_AGENTS_PER_APP
            or (found["registration_method"] == "dcr" and found["app_n"] > 0))


async def _start_locked(conn: Conn, settings: Settings, cmd: StartSession, params: dict[str, Any]
                        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A start under the capacity lock taken first (a child, or a root near a limit): the session
    row inserted, and the parent row (locked) of a child."""
    _, (found,) = await q_batch(conn, (XACT_LOCK_SQL, (params["lock_key"],)), (_START_SQL, params))
    _check_application_and_record(found, cmd)
    dcr = found["registration_method"] == "dcr"
    counts = found
    if _near_a_limit(found, settings):
        # Near a limit: the live count is only an upper bound; count the capacity-live sessions.
        counts = one(await q1(conn, f"""
            SELECT count(*) AS zone_n, count(*) FILTER (WHERE s.application_id = %(app)s) AS app_n
            FROM sessions s WHERE s.zone_id = %(zone)s AND {CAPACITY_LIVE_SQL}""",
                          {"app": cmd.application_id, "zone": cmd.zone_id}))
    if counts["zone_n"] >= settings.MAX_AGENTS_PER_ZONE:
        raise CoordinatorError(429, "session_zone_limit_exceeded")
    if dcr and counts["app_n"] > 0:
        raise CoordinatorError(409, "dcr_application_already_bound")
    if counts["app_n"] >= settings.MAX_AGENTS_PER_APP:
        raise CoordinatorError(429, "session_limit_exceeded")

    parent = None
    if cmd.parent_id:
        parent = await q1(conn, f"""SELECT {SNAPSHOT_COLUMNS}, s.child_count, s.max_children, s.depth,
                                          a.registration_method
                                   FROM sessions s JOIN applications a
                                     ON a.zone_id = s.zone_id AND a.id = s.application_id
                                   WHERE s.zone_id = %s AND s.id = %s AND s.status = 'active'
                                   FOR UPDATE OF s""", (cmd.zone_id, cmd.parent_id))
        if parent is None:
            raise CoordinatorError(404, "parent_not_found")
        if parent["registration_method"] == "dcr":
            raise CoordinatorError(409, "dcr_application_cannot_start_child")
        if parent["lifecycle"] == "task" and cmd.lifecycle == "service":
            raise CoordinatorError(409, "task_session_cannot_start_service")
        if parent["application_id"] != cmd.application_id and not cmd.may_spawn_under(parent["application_id"]):
            raise CoordinatorError(403, "parent_ownership_required")
        if parent["child_count"] >= min(parent["max_children"], settings.MAX_CHILDREN):
            raise CoordinatorError(429, "session_children_limit_exceeded")
        depth = parent["depth"] + 1
        if depth > settings.MAX_SESSION_DEPTH:
            raise CoordinatorError(429, "session_depth_limit_exceeded")
        params.update(depth=depth, root=parent["root_id"])

    row = found
    if row["id"] is None:  # a child, or a root whose upper-bound count was near a limit: checked above
        row = one(await q1(conn, _START_SQL, {**params, "insert": True, "capacity_counted": True}))
        _check_application_and_record(row, cmd)  # archived or revoked since (not under this lock)
        assert row["id"] is not None
    return row, parent


async def _start_root_at_commit(conn: Conn, settings: Settings, cmd: StartSession, params: dict[str, Any]
                                ) -> dict[str, Any] | None:
    """A root start whose checks pass on the zone's counts read without the lock: its row as it will
    be inserted with the COMMIT, after the capacity lock and a second look at the counts under it
    (`_GUARDED_START_SQL`), so the lock is held only while Postgres runs the transaction's last
    statements. None when a count is near a limit: then the start counts under the lock."""
    found = one(await q1(conn, _START_SQL, {**params, "insert": False}))
    _check_application_and_record(found, cmd)
    if _near_a_limit(found, settings):
        return None
    await at_commit(conn, XACT_LOCK_SQL, (params["lock_key"],))
    await at_commit(conn, _GUARDED_START_SQL, {**params, "dcr": found["registration_method"] == "dcr"})
    now, service = found["tx_now"], cmd.lifecycle == "service"
    # What the insert writes (column defaults included), for the answer and the notice.
    return {"id": cmd.session_id, "zone_id": cmd.zone_id, "application_id": cmd.application_id, "parent_id": None,
            "root_id": cmd.session_id, "subject_authority_record_id": cmd.authority_record_id,
            "lifecycle": cmd.lifecycle, "labels": list(cmd.labels), "status": "active", "depth": 0,
            "ttl_seconds": cmd.ttl_seconds, "started_at": now, "terminated_at": None, "termination_reason": None,
            "last_heartbeat_at": now if service else None,
            "heartbeat_deadline_at": now + timedelta(seconds=settings.SERVICE_AGENT_LEASE_SECONDS) if service else None,
            "lease_generation": 1 if service else 0, "state_version": 1}


async def _inherit_parent_edge(conn: Conn, cmd: StartSession, events: list[Event]) -> str | None:
    """Mirror the parent's single live same-application inbound edge onto the child (reference §6.5)."""
    params: list[Any] = [cmd.zone_id, cmd.parent_id, cmd.application_id]
    only = ""
    if cmd.inherit_parent_edge_id:
        only, params = " AND id = %s", params + [cmd.inherit_parent_edge_id]
    candidates = await q(conn, f"""SELECT id, receiver_application_id, resource_id, scopes, constraints_json,
                                          expires_at, (status = 'active' AND expires_at > now()) AS live
                                   FROM delegation_edges
                                   WHERE zone_id = %s AND target_session_id = %s AND receiver_application_id = %s{only}
                                   ORDER BY id""", params)
    live = [c for c in candidates if c["live"]]
    if not live:
        if cmd.inherit_parent_edge_id or candidates:
            raise CoordinatorError(409, "inherit_parent_edge_not_active")
        return None
    if len(live) > 1:
        raise CoordinatorError(409, "inherit_parent_edge_ambiguous")
    parent_edge = live[0]
    edge_id = new_id()
    await conn.execute(
        """INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
               receiver_application_id, parent_edge_id, resource_id, scopes, constraints_json, expires_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (edge_id, cmd.zone_id, cmd.parent_id, cmd.session_id, parent_edge["receiver_application_id"],
         cmd.application_id, parent_edge["id"], parent_edge["resource_id"], parent_edge["scopes"],
         Jsonb(parent_edge["constraints_json"]), parent_edge["expires_at"]))
    epoch = await bump_epoch(conn, cmd.zone_id)
    events.append(Event(DELEGATIONS_INVALIDATE, f"edge_create:{edge_id}", {
        "event": "edge_create", "zone_id": cmd.zone_id, "edge_id": edge_id, "source_session_id": cmd.parent_id,
        "target_session_id": cmd.session_id, "epoch": epoch}))
    return edge_id


# ----------------------------------------------------------------------------------------------
# suspend / resume / terminate subtrees


def _exempt_record_sql(ar: str, affected: str) -> str:
    """§5.3: authority record `ar` loses nothing when the sessions of the SQL set `affected` stop:
    an application record, or one with another live session."""
    return f"""({ar}.session_type = 'application' OR EXISTS (
        SELECT 1 FROM sessions o WHERE o.zone_id = {ar}.zone_id AND o.subject_authority_record_id = {ar}.id
          AND o.status IN {lifecycle.SESSION_LIVE_SQL} AND o.id NOT IN ({affected})))"""


async def _revocation_events(conn: Conn, zone_id: str, rows: list[dict[str, Any]], kind: str,
                             reason: str, versioned: bool) -> list[Event]:
    """`caracal.sessions.revoke` events for the affected sessions, minus exempt records (§5.3)."""
    exempt_rows = await q(conn, f"""
        SELECT ar.id FROM authority_records ar
        WHERE ar.zone_id = %(zone)s AND ar.id = ANY(%(records)s)
          AND {_exempt_record_sql("ar", "SELECT unnest(%(affected)s::text[])")}""",
                          {"zone": zone_id, "records": sorted({r["subject_authority_record_id"] for r in rows}),
                           "affected": [r["id"] for r in rows]})
    exempt = {r["id"] for r in exempt_rows}
    events = []
    for r in rows:
        if r["subject_authority_record_id"] in exempt:
            continue
        key = f"{kind}:{r['id']}" + (f":{r['state_version']}" if versioned else "")
        events.append(Event(SESSIONS_REVOKE, key, {
            "zone_id": zone_id, "session_id": r["subject_authority_record_id"],
            "agent_session_id": r["id"], "reason": reason}))
    return events


def subtree_sql(statuses: str, root_flag: bool = False) -> str:
    """`tree`: the roots `%(roots)s` of zone `%(zone)s` in one of `statuses` (an SQL list), and their
    descendants in one of them, reached through parents in one of them (`is_root` with root_flag).

    Each step looks up the children of one node through `sessions_parent` (the LATERAL subquery,
    kept apart by OFFSET 0). Left to join the whole step, the planner cannot know how few rows the
    walk holds, and without statistics (a fresh deployment) it read every session per node:
    85 ms for a 200-descendant tree among 5,000 sessions, against 1 ms."""
    flag = (", true AS is_root", ", false") if root_flag else ("", "")
    return f"""tree AS (
            SELECT id{flag[0]} FROM sessions
            WHERE zone_id = %(zone)s AND id = ANY(%(roots)s) AND status IN {statuses}
            UNION
            SELECT c.id{flag[1]} FROM tree t CROSS JOIN LATERAL (
                SELECT s.id FROM sessions s WHERE s.parent_id = t.id AND s.status IN {statuses} OFFSET 0) c
        )"""


# `_roots_first` in SQL, over the rows `c` of a cascade: the roots (in the order given), then by id.
_ROOTS_FIRST = "array_position(%(roots)s::text[], c.id) NULLS LAST, c.id"
_EVENT_RANK = f"row_number() OVER (ORDER BY {_ROOTS_FIRST})"


async def _change_subtree(conn: Conn, statuses: str, update: str, events: str, params: dict[str, Any]) -> int:
    """Run a subtree status change `update` (an UPDATE of the sessions in `tree`, RETURNING
    SNAPSHOT_COLUMNS, subject_authority_record_id) and write its events and workflow notices in the
    same statement: the rows of a 1,000-session cascade never travel to Python and back. `events`
    selects (part, rank, topic, key, payload) from `changed`, `rank` from `_EVENT_RANK`; events and
    notices go roots first. The notices are one fan-out row, spread by the dispatcher. The number
    of sessions changed.

    The events' keys name each session's new state_version, so none can have been written before:
    no ON CONFLICT arbiter check (1 ms per 200 rows). Their `seq` comes straight from its sequence:
    the UPDATE that returned their rows has given the transaction its xid, which is what the
    column's default (`caracal_outbox_next_seq`, migration 0002) otherwise ensures first."""
    cur = await conn.execute(f"""
        WITH RECURSIVE {subtree_sql(statuses)},
        changed AS ({update}),
        written_events AS (
            INSERT INTO caracal_outbox (seq, id, producer, zone_id, topic, dedupe_key, payload_json)
            SELECT nextval('caracal_outbox_seq_seq'), {NEW_ID_SQL}, 'coordinator', %(zone)s, e.topic, e.key,
                   e.payload
            FROM ({events}) e ORDER BY e.part, e.rank
        ),
        notices AS ({fanout_sql("changed", _ROOTS_FIRST)})
        SELECT (SELECT count(*) FROM changed) AS n, {notify_sql("notices")} AS notified""",
                             params)
    return int(one(await cur.fetchone())["n"])


async def suspend_subtree(conn: Conn, zone_id: str, root_ids: list[str], reason: str) -> int:
    """Suspend active roots and their active descendants (descent stops at non-active nodes), with
    a lifecycle event for each and a revocation event where the subject record loses its last
    live session (§5.3). The number suspended."""
    return await _change_subtree(conn, "('active')", f"""
        UPDATE sessions s SET status = 'suspended', updated_at = now(), state_version = s.state_version + 1
        WHERE s.id = ANY(ARRAY(SELECT id FROM tree)) AND s.status = 'active'
          AND {history.change_reason_sql("'suspended: ' || COALESCE(%(reason)s::text, 'requested')")}
        RETURNING {SNAPSHOT_COLUMNS}, s.subject_authority_record_id""", f"""
        SELECT 1 AS part, {_EVENT_RANK} AS rank, '{AGENTS_LIFECYCLE}' AS topic,
               'suspend:' || c.id || ':' || c.state_version AS key,
               jsonb_build_object('event', 'suspend', 'zone_id', %(zone)s::text, 'agent_session_id', c.id,
                                  'parent_id', c.parent_id, 'reason', %(reason)s::text) AS payload
        FROM changed c
        UNION ALL
        SELECT 2, {_EVENT_RANK}, '{SESSIONS_REVOKE}', 'agent_suspend:' || c.id || ':' || c.state_version,
               jsonb_build_object('zone_id', %(zone)s::text, 'session_id', c.subject_authority_record_id,
                                  'agent_session_id', c.id, 'reason', %(reason)s::text)
        FROM changed c
        WHERE NOT EXISTS (SELECT 1 FROM authority_records ar
                          WHERE ar.zone_id = %(zone)s AND ar.id = c.subject_authority_record_id
                            AND {_exempt_record_sql("ar", "SELECT id FROM changed")})""",
        {"zone": zone_id, "roots": root_ids, "reason": reason,
         "signal": wc.SESSION_SUSPENDED, "summary": _subtree_summary("suspended", root_ids, reason)})


async def resume_subtree(conn: Conn, settings: Settings, zone_id: str, root_id: str) -> int:
    """Resume a suspended root and its suspended descendants; services get a fresh lease deadline.
    The number resumed."""
    return await _change_subtree(conn, "('suspended')", f"""
        UPDATE sessions s SET status = 'active', updated_at = now(), state_version = s.state_version + 1,
            heartbeat_deadline_at = CASE WHEN s.lifecycle = 'service'
                THEN now() + make_interval(secs => %(lease)s) ELSE s.heartbeat_deadline_at END
        WHERE s.id = ANY(ARRAY(SELECT id FROM tree)) AND s.status = 'suspended'
          AND {history.change_reason_sql("'resumed'")}
        RETURNING {SNAPSHOT_COLUMNS}, s.subject_authority_record_id""", f"""
        SELECT 1 AS part, {_EVENT_RANK} AS rank, '{AGENTS_LIFECYCLE}' AS topic,
               'resume:' || c.id || ':' || c.state_version AS key,
               jsonb_build_object('event', 'resume', 'zone_id', %(zone)s::text, 'agent_session_id', c.id,
                                  'parent_id', c.parent_id) AS payload
        FROM changed c""",
        {"zone": zone_id, "roots": [root_id], "reason": None,
         "lease": settings.SERVICE_AGENT_LEASE_SECONDS, "signal": wc.SESSION_RESUMED,
         "summary": _subtree_summary("resumed", [root_id], None)})


async def terminate_subtree(conn: Conn, zone_id: str, root_ids: list[str], reason: str,
                            root_status: str = "terminated") -> list[dict[str, Any]]:
    """Reference §5.2: end the roots (status `root_status`) and their live descendants."""
    rows = await q(conn, f"""
        WITH RECURSIVE {subtree_sql(lifecycle.SESSION_LIVE_SQL, root_flag=True)}, collected AS (
            SELECT id, bool_or(is_root) AS is_root FROM tree GROUP BY id
        )
        UPDATE sessions s SET
            status = CASE WHEN c.is_root THEN %(root_status)s ELSE 'terminated' END,
            termination_reason = CASE WHEN c.is_root THEN %(reason)s ELSE 'parent_terminated' END,
            terminated_at = now(), updated_at = now(), state_version = s.state_version + 1
        FROM collected c
        WHERE s.id = ANY(ARRAY(SELECT id FROM collected)) AND s.id = c.id AND s.status IN {lifecycle.SESSION_LIVE_SQL}
        RETURNING {SNAPSHOT_COLUMNS}, s.subject_authority_record_id
        """, {"zone": zone_id, "roots": root_ids, "reason": reason, "root_status": root_status})
    if not rows:
        return []
    rows = _roots_first(rows, root_ids)
    ids = [r["id"] for r in rows]
    # Live-children counters of parents outside the collected set (floored at 0).
    await conn.execute("""
        UPDATE sessions p SET child_count = GREATEST(p.child_count - x.n, 0), updated_at = now()
        FROM (SELECT parent_id, count(*) AS n FROM sessions WHERE id = ANY(%(ids)s) AND parent_id IS NOT NULL
              GROUP BY parent_id) x
        WHERE p.id = x.parent_id AND NOT (p.id = ANY(%(ids)s))""", {"ids": ids})
    notices = session_notices(rows, wc.SESSION_TERMINATED, _subtree_summary(root_status, root_ids, reason))
    events = await revoke_edges_touching(conn, zone_id, ids, reason, notices)
    events += [Event(AGENTS_LIFECYCLE, f"terminate:{r['id']}", {
        "event": "terminate", "zone_id": zone_id, "agent_session_id": r["id"], "parent_id": r["parent_id"],
        "reason": reason}) for r in rows]
    events += await _revocation_events(conn, zone_id, rows, "agent_terminate", reason, versioned=False)
    await publish(conn, zone_id, events, notices)
    return rows


def _roots_first(rows: list[dict[str, Any]], root_ids: list[str]) -> list[dict[str, Any]]:
    """UPDATE ... RETURNING has no defined order: the roots' notices go out first."""
    first = {sid: i for i, sid in enumerate(root_ids)}
    return sorted(rows, key=lambda r: (first.get(r["id"], len(first)), r["id"]))


def _subtree_summary(what: str, root_ids: list[str], reason: str | None) -> str:
    roots = root_ids[0] if len(root_ids) == 1 else f"{len(root_ids)} roots"
    return f"{what} with the subtree of {roots}" + (f" ({reason})" if reason else "")


async def revoke_edges_touching(conn: Conn, zone_id: str, session_ids: list[str], reason: str,
                                notices: list[WorkflowNotice]) -> list[Event]:
    """§5.2 step 4: revoke every active edge with an endpoint among the sessions; one epoch bump.

    Appends to `notices` for the live endpoints outside `session_ids`: they lost (or gave up) the edge."""
    edges = await q(conn, f"""
        UPDATE delegation_edges SET status = 'revoked', revoked_at = now(), updated_at = now(),
            edge_version = edge_version + 1
        WHERE zone_id = %(zone)s AND status = 'active'
          AND (source_session_id = ANY(%(ids)s) OR target_session_id = ANY(%(ids)s))
          AND {history.change_reason_sql("'endpoint ended: ' || COALESCE(%(reason)s::text, 'requested')")}
        RETURNING id, source_session_id, target_session_id""", {"zone": zone_id, "ids": session_ids, "reason": reason})
    if not edges:
        return []
    edges.sort(key=lambda e: e["id"])
    notices += await edge_end_notices(conn, zone_id, edges, f"revoked ({reason})")
    epoch = await bump_epoch(conn, zone_id)
    return [Event(DELEGATIONS_INVALIDATE, f"edge_revoke:{e['id']}", {
        "event": "edge_revoke", "zone_id": zone_id, "edge_id": e["id"], "reason": reason, "epoch": epoch})
        for e in edges]


async def edge_end_notices(conn: Conn, zone_id: str, edges: list[dict[str, Any]], how: str) -> list[Any]:
    """`delegation_ended` notices to the still-live endpoints of ended edges (id, source and target)."""
    endpoints = {e[k] for e in edges for k in ("source_session_id", "target_session_id")}
    live = {r["id"]: r for r in await q(conn, f"""SELECT {SNAPSHOT_COLUMNS} FROM sessions s
                                                 WHERE s.zone_id = %s AND s.id = ANY(%s)
                                                   AND s.status IN {lifecycle.SESSION_LIVE_SQL}""",
                                        (zone_id, sorted(endpoints)))}
    notices = []
    for e in edges:
        for me, peer, role in (("source_session_id", "target_session_id", "given"),
                               ("target_session_id", "source_session_id", "received")):
            row = live.get(e[me])
            if row is not None:
                notices.append(session_notice(row, wc.DELEGATION_ENDED, f"edge {e['id']} ({role}) {how}",
                                              edge_id=e["id"], peer_session_id=e[peer]))
    return notices


# ----------------------------------------------------------------------------------------------
# leases and deadlines


async def take_lease(conn: Conn, settings: Settings, zone_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """A new lease generation for a live service session (its row locked by the caller)."""
    if row["status"] not in lifecycle.SESSION_LIVE:
        raise CoordinatorError(409, "session_not_live")
    if row["lifecycle"] != "service":
        raise CoordinatorError(409, "session_not_service")
    taken = one(await q1(conn, f"""
        UPDATE sessions s SET lease_generation = s.lease_generation + 1, last_heartbeat_at = now(),
            last_active_at = now(), heartbeat_deadline_at = now() + make_interval(secs => %s), updated_at = now(),
            state_version = s.state_version + 1
        WHERE s.zone_id = %s AND s.id = %s RETURNING {SNAPSHOT_COLUMNS}""",
                        (settings.SERVICE_AGENT_LEASE_SECONDS, zone_id, row["id"])))
    await enqueue(conn, [session_notice(taken, wc.SESSION_LEASE_TAKEN,
                                        f"lease taken over: generation {taken['lease_generation']}")])
    return taken


async def settle_deadline(conn: Conn, zone_id: str, session_id: str) -> dict[str, Any] | None:
    """Expire a task past its TTL or suspend a service past its lease, if still due; the row after.

    Run by the session workflow's timer (and by a heartbeat or takeover that finds the lease lapsed
    first). Nothing due (a heartbeat moved the lease, the session ended meanwhile): nothing changes.
    """
    due = await q1(conn, f"""
        SELECT {lifecycle.ttl_due_sql("s")} AS ttl_due, {lifecycle.lease_due_sql("s")} AS lease_due
        FROM sessions s WHERE s.zone_id = %(zone)s AND s.id = %(id)s FOR UPDATE""",
                   {"zone": zone_id, "id": session_id})
    if due is None:
        return None
    if due["ttl_due"]:
        await terminate_subtree(conn, zone_id, [session_id], "ttl", "expired")
    elif due["lease_due"]:
        await suspend_subtree(conn, zone_id, [session_id], "service_heartbeat_lost")
    return await get_session(conn, zone_id, session_id)
