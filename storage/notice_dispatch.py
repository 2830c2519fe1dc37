"""The SQL of the workflow-outbox dispatcher (notices/): claim, settle, wake-up and statistics.

Order per workflow with several dispatchers: `claim` locks only *head* rows (no earlier row of the
same workflow is left) and then the rows that follow them. While a dispatcher holds a workflow's
head, no other dispatcher can see a later row of that workflow as a head, so each workflow's rows
are delivered one batch after the other, in `seq` order, whoever delivers them.

The caller keeps the claiming transaction open while it delivers: a crash or a lost connection
releases the locks and the rows are delivered again (at least once).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rules import workflow_contract as wc
from storage.db import Conn, Database, one, q
from storage.notices import spread_fanouts_sql

# Heads whose entity's deadline falls within this many seconds are claimed before older rows.
DUE_SOON_SECONDS = 60
# A dispatcher whose heartbeat is older than this is not counted as running.
LIVE_SECONDS = 15
# Upper bounds (seconds) of the follow-lag histogram's buckets (migration 0010).
LAG_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_MAX_ERROR_CHARS = 2000
# coordinator_counters names: the totals of dispatchers that have stopped (see `retire`).
RETIRED_DELIVERED = "workflow_dispatch_delivered"
RETIRED_FAILED = "workflow_dispatch_failed"

_OUTBOX_COLUMNS = """seq, workflow_id, workflow_type, signal, payload, start_args, search_attributes, summary,
    task_queue, created_at, attempts"""
# Rows behind a fan-out row not yet spread wait: some may be of its sessions' workflows, whose
# notices in it come first. Evaluated once per statement (takes %(queue)s).
_BEFORE_FANOUTS = """o.seq < (SELECT COALESCE(min(seq), 9223372036854775807) FROM workflow_outbox_fanout
                             WHERE task_queue IN ('', %(queue)s))"""


async def spread_fanouts(db: Database, task_queue: str, limit: int) -> int:
    """Spread up to `limit` fan-out rows (a cascade's notices, storage/notices.py
    `fanout_sql`) of this task queue into their outbox rows; the rows written. One statement,
    committed at once: an unspread fan-out row holds back every later row (`_BEFORE_FANOUTS`), so it
    must not wait for the commit of a batch that is still delivering."""
    return int(await db.fetchval(spread_fanouts_sql(), {"queue": task_queue, "limit": limit}))


async def claim(conn: Conn, limit: int, per_workflow: int, task_queue: str, *, due_soon_only: bool = False
                ) -> list[dict[str, Any]]:
    """Lock up to `limit` deliverable head rows (due, of this dispatcher's task queue or of none)
    and up to `per_workflow - 1` following rows of each of their workflows. Returns the rows in
    `seq` order. Call inside a transaction; rows locked by another dispatcher are skipped."""
    # Heads whose entity's deadline is near go first (order across workflows is free), so a
    # backlog of starts never makes a timer late; then the rest, oldest first.
    heads = await q(conn, f"""
        SELECT {_OUTBOX_COLUMNS} FROM workflow_outbox o
        WHERE o.due_at < now() + make_interval(secs => %(soon)s)
          AND o.available_at <= now()
          AND o.task_queue IN ('', %(queue)s)
          AND {_BEFORE_FANOUTS}
          AND NOT EXISTS (SELECT 1 FROM workflow_outbox p WHERE p.workflow_id = o.workflow_id AND p.seq < o.seq)
        ORDER BY o.due_at
        LIMIT %(limit)s
        FOR UPDATE OF o SKIP LOCKED""", {"queue": task_queue, "limit": limit, "soon": DUE_SOON_SECONDS})
    if len(heads) < limit and not due_soon_only:
        cur = await conn.execute(f"""
            SELECT {_OUTBOX_COLUMNS} FROM workflow_outbox o
            WHERE o.available_at <= now()
              AND o.task_queue IN ('', %(queue)s)
              AND NOT (o.seq = ANY(%(taken)s::bigint[]))
              AND {_BEFORE_FANOUTS}
              AND NOT EXISTS (SELECT 1 FROM workflow_outbox p WHERE p.workflow_id = o.workflow_id AND p.seq < o.seq)
            ORDER BY o.seq
            LIMIT %(limit)s
            FOR UPDATE OF o SKIP LOCKED""",
                                 {"queue": task_queue, "limit": limit - len(heads), "taken": [h["seq"] for h in heads]})
        heads += await cur.fetchall()
    if not heads or per_workflow <= 1:
        return heads
    # No other dispatcher can hold these (only heads are claimed, and we hold the heads): a plain
    # FOR UPDATE never waits here, and never leaves a gap in a workflow's chain as SKIP LOCKED could.
    cur = await conn.execute(f"""
        SELECT f.* FROM unnest(%(wids)s::text[], %(seqs)s::bigint[]) AS h(workflow_id, head_seq)
        CROSS JOIN LATERAL (
            SELECT {_OUTBOX_COLUMNS} FROM workflow_outbox o
            WHERE o.workflow_id = h.workflow_id AND o.seq > h.head_seq AND {_BEFORE_FANOUTS}
            ORDER BY o.seq
            LIMIT %(n)s
            FOR UPDATE
        ) f""", {"wids": [h["workflow_id"] for h in heads], "seqs": [h["seq"] for h in heads],
                 "n": per_workflow - 1, "queue": task_queue})
    followers = await cur.fetchall()
    return sorted([*heads, *followers], key=lambda r: r["seq"])


async def delete_delivered(conn: Conn, seqs: Sequence[int]) -> None:
    if seqs:
        await conn.execute("DELETE FROM workflow_outbox WHERE seq = ANY(%s::bigint[])", (list(seqs),))


@dataclass(frozen=True)
class Deferral:
    """A row due again `delay_s` from now: its delivery failed (`error`; `count_attempt` adds 1 to
    attempts), or it was put off (`error` None keeps the row's last error)."""

    seq: int
    delay_s: float
    error: str | None
    count_attempt: bool = True


async def defer(conn: Conn, deferrals: Sequence[Deferral]) -> None:
    if not deferrals:
        return
    await conn.execute("""
        UPDATE workflow_outbox o
        SET attempts = o.attempts + CASE WHEN d.counted THEN 1 ELSE 0 END,
            available_at = now() + make_interval(secs => d.delay),
            last_error = COALESCE(d.error, o.last_error)
        FROM unnest(%s::bigint[], %s::float8[], %s::text[], %s::bool[]) AS d(seq, delay, error, counted)
        WHERE o.seq = d.seq""",
        ([d.seq for d in deferrals], [max(0.0, d.delay_s) for d in deferrals],
         [None if d.error is None else d.error[:_MAX_ERROR_CHARS] for d in deferrals],
         [d.count_attempt for d in deferrals]))


# The notices waiting in fan-out rows not yet spread, per row.
_FANOUT_NOTICES = "cardinality(sessions)"


async def pending(db: Database, task_queue: str) -> int:
    """Notices a dispatcher of `task_queue` has left to deliver (due or not, locked or not, spread
    or not)."""
    return int(await db.fetchval(f"""
        SELECT (SELECT count(*) FROM workflow_outbox WHERE task_queue IN ('', %(queue)s))
             + (SELECT COALESCE(sum({_FANOUT_NOTICES}), 0) FROM workflow_outbox_fanout
                WHERE task_queue IN ('', %(queue)s))""", {"queue": task_queue}))


async def delivered(db: Database, workflow_id: str) -> bool:
    """Whether no notice for the workflow waits: no row of it, and its session in no fan-out row."""
    return bool(await db.fetchval(f"""
        SELECT NOT EXISTS (SELECT 1 FROM workflow_outbox WHERE workflow_id = %(wid)s)
           AND NOT EXISTS (SELECT 1 FROM workflow_outbox_fanout f CROSS JOIN LATERAL unnest(f.sessions) e
                           WHERE {wc.session_workflow_id_sql("e.zone_id", "e.id")} = %(wid)s)""",
                                  {"wid": workflow_id}))


async def backlog(db: Database) -> dict[str, Any]:
    """The whole outbox: notices waiting (spread or not), age of the oldest (seconds), rows being
    retried."""
    row = one(await db.fetchrow(f"""
        WITH rows AS (
            SELECT 1::bigint AS n, created_at, attempts FROM workflow_outbox
            UNION ALL
            SELECT {_FANOUT_NOTICES}, created_at, 0 FROM workflow_outbox_fanout
        )
        SELECT COALESCE(sum(n), 0)::bigint AS backlog,
               COALESCE(GREATEST(EXTRACT(EPOCH FROM now() - min(created_at)), 0), 0)::float8 AS oldest_age_seconds,
               count(*) FILTER (WHERE attempts > 0) AS retrying
        FROM rows"""))
    return {"backlog": int(row["backlog"]), "oldest_age_seconds": float(row["oldest_age_seconds"]),
            "retrying": int(row["retrying"])}


@dataclass
class LagHistogram:
    """Follow lags counted into LAG_BUCKETS_S (one more bucket for the lags above every bound)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS_S) + 1))
    sum_s: float = 0.0
    count: int = 0

    def observe(self, lag_s: float) -> None:
        self.buckets[bisect.bisect_left(LAG_BUCKETS_S, lag_s)] += 1
        self.sum_s += lag_s
        self.count += 1


async def record_stats(conn: Conn, dispatcher_id: str, *, delivered: int, failed: int, rate_per_s: float,
                       lag_p50_ms: float | None, lag_p95_ms: float | None, temporal_ok: bool,
                       lags: LagHistogram | None = None) -> None:
    """Upsert this dispatcher's counters (totals since it started) and its heartbeat."""
    lags = lags or LagHistogram()
    await conn.execute("""
        INSERT INTO workflow_dispatchers (dispatcher_id, delivered, failed, rate_per_s, lag_p50_ms, lag_p95_ms,
                                          temporal_ok, lag_buckets, lag_sum_s, lag_count, started_at, heartbeat_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now(), now())
        ON CONFLICT (dispatcher_id) DO UPDATE
        SET delivered = EXCLUDED.delivered, failed = EXCLUDED.failed, rate_per_s = EXCLUDED.rate_per_s,
            lag_p50_ms = EXCLUDED.lag_p50_ms, lag_p95_ms = EXCLUDED.lag_p95_ms,
            temporal_ok = EXCLUDED.temporal_ok, lag_buckets = EXCLUDED.lag_buckets,
            lag_sum_s = EXCLUDED.lag_sum_s, lag_count = EXCLUDED.lag_count, heartbeat_at = now()""",
        (dispatcher_id, delivered, failed, rate_per_s, lag_p50_ms, lag_p95_ms, temporal_ok,
         lags.buckets, lags.sum_s, lags.count))


async def lag_histogram(db: Database, live_seconds: float = LIVE_SECONDS) -> LagHistogram:
    """The running dispatchers' follow-lag histograms summed (a stopped dispatcher's counts go
    with its row, as a restarted process's counters would)."""
    rows = await db.fetch("""SELECT lag_buckets, lag_sum_s, lag_count FROM workflow_dispatchers
                             WHERE heartbeat_at > now() - make_interval(secs => %s)""", (live_seconds,))
    total = LagHistogram()
    for r in rows:
        for i, n in enumerate(r["lag_buckets"][:len(total.buckets)]):
            total.buckets[i] += int(n)
        total.sum_s += float(r["lag_sum_s"])
        total.count += int(r["lag_count"])
    return total


async def retire(conn: Conn, dispatcher_ids: Sequence[str] | None = None, *,
                 silent_for_seconds: float | None = None) -> int:
    """Fold the counters of stopped dispatchers into `coordinator_counters` and delete their rows,
    so that `workflow_dispatchers` lists running dispatchers and the totals never go down. Either
    the given ids (a dispatcher stopping) or those silent for `silent_for_seconds` (crashed ones)."""
    cur = await conn.execute("""
        WITH gone AS (
            DELETE FROM workflow_dispatchers
            WHERE dispatcher_id = ANY(%(ids)s::text[])
               OR heartbeat_at < now() - make_interval(secs => %(silent)s::float8)
            RETURNING delivered, failed
        ), totals AS (
            SELECT count(*) AS n, COALESCE(sum(delivered), 0) AS delivered, COALESCE(sum(failed), 0) AS failed
            FROM gone
        ), upserted AS (
            INSERT INTO coordinator_counters AS c (name, value)
            SELECT name, value FROM totals,
                   LATERAL (VALUES (%(delivered)s, totals.delivered), (%(failed)s, totals.failed)) v(name, value)
            WHERE totals.n > 0
            ON CONFLICT (name) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = now()
        )
        SELECT n FROM totals""",
        {"ids": list(dispatcher_ids or []), "silent": silent_for_seconds,
         "delivered": RETIRED_DELIVERED, "failed": RETIRED_FAILED})
    return int(one(await cur.fetchone())["n"])


async def dispatch_stats(db: Database, live_seconds: float = LIVE_SECONDS) -> dict[str, Any]:
    """Totals over every dispatcher that ever ran (delivered, failed; retired ones included) and
    the state of those with a recent heartbeat: how many, their summed rate, the worst lag
    percentiles, and whether all of them reach Temporal (None when none is running)."""
    row = one(await db.fetchrow("""
        WITH d AS (SELECT *, heartbeat_at > now() - make_interval(secs => %s) AS live FROM workflow_dispatchers),
             retired AS (SELECT COALESCE(sum(value) FILTER (WHERE name = %s), 0) AS delivered,
                                COALESCE(sum(value) FILTER (WHERE name = %s), 0) AS failed
                         FROM coordinator_counters WHERE name IN (%s, %s))
        SELECT count(*) FILTER (WHERE live) AS dispatchers,
               (COALESCE(sum(delivered), 0) + (SELECT delivered FROM retired))::bigint AS delivered_total,
               (COALESCE(sum(failed), 0) + (SELECT failed FROM retired))::bigint AS failed_total,
               COALESCE(sum(rate_per_s) FILTER (WHERE live), 0)::float8 AS delivered_per_second,
               max(lag_p50_ms) FILTER (WHERE live) AS lag_p50_ms,
               max(lag_p95_ms) FILTER (WHERE live) AS lag_p95_ms,
               bool_and(temporal_ok) FILTER (WHERE live) AS temporal_ok
        FROM d""", (live_seconds, RETIRED_DELIVERED, RETIRED_FAILED, RETIRED_DELIVERED, RETIRED_FAILED)))
    return {"dispatchers": int(row["dispatchers"]), "delivered_total": int(row["delivered_total"]),
            "failed_total": int(row["failed_total"]), "delivered_per_second": float(row["delivered_per_second"]),
            "lag_p50_ms": row["lag_p50_ms"], "lag_p95_ms": row["lag_p95_ms"], "temporal_ok": row["temporal_ok"]}


async def counter(db: Database, name: str) -> int:
    """A `coordinator_counters` total (e.g. 'reconciler_started'); 0 when never counted."""
    return int(await db.fetchval("SELECT COALESCE((SELECT value FROM coordinator_counters WHERE name = %s), 0)",
                                 (name,)))
