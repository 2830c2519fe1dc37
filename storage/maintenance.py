"""The SQL of maintenance: retention (reference §9) and the workflow reconciler's reads and
writes (maintenance/). Edge expiry is a delegation change and lives with them (storage/delegations.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rules import lifecycle
from rules import workflow_contract as wc
from settings import Settings
from storage.db import Conn, one
from storage.notices import SNAPSHOT_COLUMNS, SNAPSHOT_INVOCATION_COLUMNS, enqueue, invocation_notice, session_notice


# ---------------------------------------------------------------------------------- retention

async def retention(conn: Conn, settings: Settings) -> dict[str, int]:
    """§9 retention: old revoked/expired edges, status history and bulk revocation records, published
    outbox rows, expired receipts, old op results."""
    batch = settings.RETENTION_CLEANUP_BATCH_SIZE
    counts = {}
    for name, sql, params in (
        ("deleted_edges", """DELETE FROM delegation_edges WHERE id IN (
            SELECT id FROM delegation_edges WHERE status IN ('revoked', 'expired')
              AND COALESCE(revoked_at, expires_at, updated_at, created_at) < now() - make_interval(days => %s)
            LIMIT %s)""", (settings.DELEGATION_RETENTION_DAYS, batch)),
        # The status history answers `at=` for the same window as ended edges are kept: a row before
        # the window goes once a later one, still before it, says the status at the window's start
        # (or once its edge is gone).
        ("deleted_status_history", """DELETE FROM status_history WHERE seq IN (
            SELECT h.seq FROM status_history h
            WHERE h.changed_at < now() - make_interval(days => %(days)s)
              AND (EXISTS (SELECT 1 FROM status_history l
                           WHERE l.entity_id = h.entity_id AND l.entity = h.entity
                             AND l.changed_at < now() - make_interval(days => %(days)s)
                             AND (l.changed_at, l.seq) > (h.changed_at, h.seq))
                   OR (h.entity = 'edge' AND NOT EXISTS (SELECT 1 FROM delegation_edges x WHERE x.id = h.entity_id)))
            LIMIT %(batch)s)""", {"days": settings.DELEGATION_RETENTION_DAYS, "batch": batch}),
        ("deleted_bulk_revocations", """DELETE FROM bulk_revocations WHERE id IN (
            SELECT id FROM bulk_revocations WHERE created_at < now() - make_interval(days => %s) LIMIT %s)""",
         (settings.DELEGATION_RETENTION_DAYS, batch)),
        ("deleted_outbox", """DELETE FROM caracal_outbox WHERE id IN (
            SELECT id FROM caracal_outbox WHERE producer = 'coordinator' AND status IN ('published', 'dead')
              AND updated_at < now() - make_interval(days => %s) LIMIT %s)""", (settings.OUTBOX_RETENTION_DAYS, batch)),
        ("deleted_idempotency_receipts", """DELETE FROM coordinator_idempotency_receipts WHERE id IN (
            SELECT id FROM coordinator_idempotency_receipts WHERE expires_at <= now()
            ORDER BY expires_at, id LIMIT %s)""",
         (batch,)),
        ("deleted_operation_results", """DELETE FROM operation_results WHERE op_id IN (
            SELECT op_id FROM operation_results WHERE created_at < now() - interval '1 day' LIMIT %s)""", (batch,)),
    ):
        cur = await conn.execute(sql, params)
        counts[name] = cur.rowcount
    return counts


# ------------------------------------------------------------------------- the reconciler


async def live_counts(conn: Conn) -> dict[str, int]:
    row = await conn.execute(f"""
        SELECT (SELECT count(*) FROM sessions WHERE status IN {lifecycle.SESSION_LIVE_SQL}) AS sessions,
               (SELECT count(*) FROM agent_invocations x
                WHERE NOT {lifecycle.invocation_finished_sql("x")}) AS invocations""")
    found = one(await row.fetchone())
    return {"sessions": int(found["sessions"]), "invocations": int(found["invocations"])}


async def oldest_waiting_notice_age(conn: Conn) -> float:
    """Seconds the oldest notice (a row, or a fan-out row not yet spread) has waited; 0 when none."""
    row = await conn.execute("""
        SELECT COALESCE(GREATEST(EXTRACT(EPOCH FROM now() - least(
                   (SELECT min(created_at) FROM workflow_outbox),
                   (SELECT min(created_at) FROM workflow_outbox_fanout))), 0), 0)::float8 AS age""")
    return float(one(await row.fetchone())["age"])


@dataclass(frozen=True)
class MissingCandidates:
    """Live entities, older than the grace period, with no notice waiting, whose workflow the
    visibility listing did not show as running: sessions' and invocations' snapshot rows."""

    sessions: list[dict[str, Any]]
    invocations: list[dict[str, Any]]

    def workflow_ids(self) -> list[str]:
        return ([wc.session_workflow_id(r["zone_id"], r["id"]) for r in self.sessions]
                + [wc.invocation_workflow_id(r["zone_id"], r["id"]) for r in self.invocations])


async def missing_candidates(conn: Conn, running_session_ids: set[str], running_invocation_ids: set[str],
                             grace_seconds: float, limit: int, only_workflow_ids: list[str] | None = None
                             ) -> MissingCandidates:
    """Up to `limit` of each kind; `only_workflow_ids` narrows the search to those workflows (the
    re-check, in the transaction that writes their notices, of candidates confirmed missing)."""
    only = "AND {wid} = ANY(%(only)s::text[])" if only_workflow_ids is not None else ""
    params = {"grace": grace_seconds, "limit": limit, "only": only_workflow_ids}
    session_wid = wc.session_workflow_id_sql("s.zone_id", "s.id")
    sessions = await conn.execute(f"""
        WITH in_fanouts AS MATERIALIZED (
            SELECT e.zone_id, e.id FROM workflow_outbox_fanout f CROSS JOIN LATERAL unnest(f.sessions) e
        )
        SELECT {SNAPSHOT_COLUMNS} FROM sessions s
        WHERE s.status IN {lifecycle.SESSION_LIVE_SQL} AND s.updated_at < now() - make_interval(secs => %(grace)s)
          AND NOT EXISTS (SELECT 1 FROM workflow_outbox o WHERE o.workflow_id = {session_wid})
          AND NOT EXISTS (SELECT 1 FROM in_fanouts i WHERE i.zone_id = s.zone_id AND i.id = s.id)
          {only.format(wid=session_wid)}
        ORDER BY s.id""", params)
    session_rows = [r for r in await sessions.fetchall()
                    if wc.session_workflow_id(r["zone_id"], r["id"]) not in running_session_ids][:limit]
    invocation_wid = wc.invocation_workflow_id_sql("x.zone_id", "x.id")
    invocations = await conn.execute(f"""
        SELECT {SNAPSHOT_INVOCATION_COLUMNS} FROM agent_invocations x
        WHERE NOT {lifecycle.invocation_finished_sql("x")}
          AND x.updated_at < now() - make_interval(secs => %(grace)s)
          AND NOT EXISTS (SELECT 1 FROM workflow_outbox o WHERE o.workflow_id = {invocation_wid})
          {only.format(wid=invocation_wid)}
        ORDER BY x.id""", params)
    invocation_rows = [r for r in await invocations.fetchall()
                       if wc.invocation_workflow_id(r["zone_id"], r["id"]) not in running_invocation_ids][:limit]
    return MissingCandidates(session_rows, invocation_rows)


async def start_missing(conn: Conn, missing: MissingCandidates) -> int:
    """A `sync` notice (signal-with-start) for each entity whose workflow is missing; counted."""
    notices = [session_notice(r, wc.SESSION_SYNC, "reconciler: workflow was missing, started from the row")
               for r in missing.sessions]
    notices += [invocation_notice(r, wc.INVOCATION_SYNC, "reconciler: workflow was missing, started from the row")
                for r in missing.invocations]
    await enqueue(conn, notices)
    if notices:
        await add_counter(conn, "reconciler_started", len(notices))
    return len(notices)


async def add_counter(conn: Conn, name: str, n: int) -> None:
    await conn.execute("""INSERT INTO coordinator_counters (name, value) VALUES (%s, %s)
                          ON CONFLICT (name) DO UPDATE SET value = coordinator_counters.value + EXCLUDED.value,
                                                           updated_at = now()""", (name, n))


async def claim_interval(conn: Conn, name: str, every_seconds: float) -> bool:
    """True for exactly one caller per interval (several maintenance runs may race)."""
    cur = await conn.execute("""
        INSERT INTO coordinator_counters AS c (name, value, updated_at) VALUES (%(name)s, 0, now())
        ON CONFLICT (name) DO UPDATE SET updated_at = now()
        WHERE c.updated_at <= now() - make_interval(secs => %(every)s)
        RETURNING 1""", {"name": name, "every": every_seconds})
    return await cur.fetchone() is not None
