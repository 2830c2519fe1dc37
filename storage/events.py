"""Reading the outbox as an ordered, resumable event feed (`GET /zones/:z/events`).

The problem: `seq` is drawn from a sequence when a row is inserted, but rows become visible when
their transaction commits. Transaction A may draw seq 10, transaction B seq 11, and B commit first.
A reader that returned 11 and moved its cursor past it would never see 10. Filtering rows on
"written by a transaction older than my snapshot's xmin" is not enough either: A (xid 101, seq 5,
still open) and B (xid 100, seq 10, committed) give xmin 101, B's row passes, and seq 5 lands
below the cursor later.

The rule used here: a page only contains rows with seq <= H, where H is a horizon that no open
transaction can commit below any more. H is found like this:

1. read the sequence's last value L (every seq <= L has been handed out by now);
2. take a snapshot and note its xmax X (every transaction holding an xid is below X);
3. wait until a later snapshot's xmin is >= X, i.e. every transaction that was open at step 2
   has committed or rolled back.

Writers draw their seq only after their transaction has an xid (the seq default
`caracal_outbox_next_seq()` of migration 0002 assigns the xid first; a subtree cascade draws its
events' seqs itself, after its UPDATE has assigned it, storage/sessions.py). So each holder of a
seq <= L got its xid before step 1, hence before the snapshot of step 2: it is below X, and after
step 3 it has ended. From then on no row with seq <= L can appear, and a read of
`cursor < seq <= L` sees every one of them that will ever exist (aborted ones never will). Cursors
are seq values, pages are in seq order: each event of a zone appears exactly once. Seq order
follows commit order for conflicting writers (a writer that waits on another's row lock draws its
seq after that one committed).

Step 3 waits for the transactions open at step 2; they are short (an activity's transaction), so
it costs a few milliseconds. A long-open transaction holds the feed back (never makes it skip):
the wait is bounded by the caller, who then gets an empty page and retries.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rules.timefmt import iso_ms
from storage.db import Database, one

SEQUENCE = "caracal_outbox_seq_seq"
MAX_LIMIT = 500
_GATE_FIRST_SLEEP = 0.002
_GATE_MAX_SLEEP = 0.05


async def stable_horizon(db: Database, timeout: float) -> int | None:
    """The greatest H such that no row with seq <= H can still appear; None if the transactions
    open right now did not all end within `timeout` seconds."""
    async with db.connection() as conn:
        cur = await conn.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS last FROM {SEQUENCE}")
        last = int(one(await cur.fetchone())["last"])
        # A separate statement: its snapshot is taken after the sequence was read.
        cur = await conn.execute("SELECT pg_snapshot_xmin(s)::text AS xmin, pg_snapshot_xmax(s)::text AS xmax "
                                 "FROM pg_current_snapshot() AS s")
        snap = one(await cur.fetchone())
    if int(snap["xmin"]) >= int(snap["xmax"]):
        return last  # no transaction was in progress
    xmax = snap["xmax"]
    deadline = time.monotonic() + timeout
    sleep = _GATE_FIRST_SLEEP
    while True:
        passed = await db.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= %s::xid8", (xmax,))
        if passed:
            return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(sleep, remaining))
        sleep = min(sleep * 2, _GATE_MAX_SLEEP)


def project(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "cursor": str(row["seq"]), "topic": row["topic"], "dedupe_key": row["dedupe_key"],
            "payload": row["payload_json"], "created_at": iso_ms(row["created_at"])}


async def read_page(db: Database, zone_id: str, *, after: int, limit: int, topic: str | None = None,
                    gate_timeout: float = 1.0) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` events of the zone with seq > `after`, in seq order, each final (see above),
    and the cursor to continue from: the last event's seq for a full page, else the horizon
    (everything up to it has been seen, so the next read need not scan it again)."""
    limit = max(1, min(limit, MAX_LIMIT))
    horizon = await stable_horizon(db, gate_timeout)
    if horizon is None or horizon <= after:
        return [], after
    sql = ("SELECT id, seq, topic, dedupe_key, payload_json, created_at FROM caracal_outbox "
           "WHERE zone_id = %s AND seq > %s AND seq <= %s")
    params: list[Any] = [zone_id, after, horizon]
    if topic is not None:
        sql += " AND topic = %s"
        params.append(topic)
    rows = await db.fetch(sql + " ORDER BY seq LIMIT %s", [*params, limit])
    next_after = int(rows[-1]["seq"]) if len(rows) == limit else horizon
    return [project(r) for r in rows], next_after
