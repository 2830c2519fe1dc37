"""The event feed: the `caracal_outbox` rows a change writes inside its own transaction
(reference §8), read back in order by `GET /zones/:z/events` (`read_page`) and relayed to Redis
Streams by feed/relay.py (`claim_for_relay`, `settle_relayed`). Each commit that writes events
notifies FEED_CHANNEL, which wakes the API's waiting readers (`feed_listener`, feed/wakeups.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from rules.ids import new_id
from rules.timefmt import iso_ms
from storage.db import ChannelListener, Conn, Database, at_commit, one

AGENTS_LIFECYCLE = "caracal.agents.lifecycle"
SESSIONS_REVOKE = "caracal.sessions.revoke"
INVOCATIONS_LIFECYCLE = "caracal.invocations.lifecycle"
DELEGATIONS_INVALIDATE = "caracal.delegations.invalidate"
TOPICS = (AGENTS_LIFECYCLE, SESSIONS_REVOKE, INVOCATIONS_LIFECYCLE, DELEGATIONS_INVALIDATE)


# `rules.ids.new_id` in SQL, for events written by a statement: a UUIDv7 (a random UUID whose
# first 48 bits are the Unix time in milliseconds and whose version nibble is 7).
NEW_ID_SQL = """encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) PLACING
    substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
    52, 1), 53, 1), 'hex')::uuid::text"""


@dataclass(frozen=True)
class Event:
    topic: str
    dedupe_key: str
    payload: dict[str, Any]
    # The payload's `epoch` is the zone's delegation graph epoch as the event is written (with the
    # COMMIT, after any bump of the same transaction): a bump queued with `at_commit` needs no
    # round trip to learn its value.
    with_graph_epoch: bool = False


async def emit(conn: Conn, zone_id: str, events: list[Event]) -> None:
    """Insert events in order; a dedupe key already present is skipped (ON CONFLICT DO NOTHING).
    The events travel as one JSON document (cheap to encode, however many)."""
    if not events:
        return
    await at_commit(
        conn,
        """
        INSERT INTO caracal_outbox (id, producer, zone_id, topic, dedupe_key, payload_json)
        SELECT e->>'id', 'coordinator', %(zone)s, e->>'topic', e->>'key',
               CASE WHEN e ? 'with_graph_epoch' THEN e->'payload' || jsonb_build_object('epoch',
                   (SELECT g.epoch FROM delegation_graph_epochs g WHERE g.zone_id = %(zone)s))
               ELSE e->'payload' END
        FROM jsonb_array_elements(%(events)s::jsonb) WITH ORDINALITY AS x(e, n)
        ORDER BY n
        ON CONFLICT (producer, topic, dedupe_key) DO NOTHING
        """,
        {"zone": zone_id, "events": Jsonb([
            {"id": new_id(), "topic": e.topic, "key": e.dedupe_key, "payload": e.payload,
             **({"with_graph_epoch": True} if e.with_graph_epoch else {})} for e in events])},
    )


# Advance the zone's delegation graph epoch (1 on first use), returning the new value.
BUMP_EPOCH_SQL = """
    INSERT INTO delegation_graph_epochs (zone_id, epoch, updated_at) VALUES (%s, 1, now())
    ON CONFLICT (zone_id) DO UPDATE SET epoch = delegation_graph_epochs.epoch + 1, updated_at = now()
    RETURNING epoch"""


async def bump_epoch(conn: Conn, zone_id: str) -> int:
    """Advance the zone's delegation graph epoch (1 on first use) and return the new value."""
    cur = await conn.execute(BUMP_EPOCH_SQL, (zone_id,))
    return int(one(await cur.fetchone())["epoch"])



# ------------------------------------------------------------------------ relaying the feed

_CLAIM_FOR_RELAY = """
SELECT id, topic, dedupe_key, payload_json, attempts FROM caracal_outbox
WHERE producer = 'coordinator' AND status = 'pending' AND available_at <= now()
ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED
"""


async def claim_for_relay(conn: Conn, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` pending rows due now, in seq order, locked for the caller's transaction
    (`SKIP LOCKED`: relays running side by side share the work)."""
    cur = await conn.execute(_CLAIM_FOR_RELAY, (limit,))
    return await cur.fetchall()


async def mark_published(conn: Conn, ids: list[str]) -> None:
    await conn.execute("""
        UPDATE caracal_outbox SET status = 'published', attempts = attempts + 1, published_at = now(),
            updated_at = now()
        WHERE id = ANY(%s)""", (ids,))


async def mark_failed(conn: Conn, max_attempts: int, ids: list[str], delays: list[float]) -> list[str]:
    """One more attempt for each row: `dead` once attempts reach `max_attempts`, else pending again
    after its delay (seconds). The rows' new statuses."""
    cur = await conn.execute("""
        UPDATE caracal_outbox AS o
        SET attempts = o.attempts + 1,
            status = CASE WHEN o.attempts + 1 >= %(max)s THEN 'dead' ELSE 'pending' END,
            available_at = CASE WHEN o.attempts + 1 >= %(max)s THEN o.available_at
                                ELSE now() + make_interval(secs => f.delay) END,
            updated_at = now()
        FROM unnest(%(ids)s::text[], %(delays)s::float8[]) AS f(id, delay)
        WHERE o.id = f.id
        RETURNING o.status""", {"max": max_attempts, "ids": ids, "delays": delays})
    return [r["status"] for r in await cur.fetchall()]

# ------------------------------------------------------------------------- reading the feed
#
# Reading the feed in order, resumably (`GET /zones/:z/events`).
#
# The problem: `seq` is drawn from a sequence when a row is inserted, but rows become visible when
# their transaction commits. Transaction A may draw seq 10, transaction B seq 11, and B commit first.
# A reader that returned 11 and moved its cursor past it would never see 10. Filtering rows on
# "written by a transaction older than my snapshot's xmin" is not enough either: A (xid 101, seq 5,
# still open) and B (xid 100, seq 10, committed) give xmin 101, B's row passes, and seq 5 lands
# below the cursor later.
#
# The rule used here: a page only contains rows with seq <= H, where H is a horizon that no open
# transaction can commit below any more. H is found like this:
#
# 1. read the sequence's last value L (every seq <= L has been handed out by now);
# 2. note the next transaction id X (every transaction holding an xid is below X);
# 3. wait until a later snapshot's xmin is >= X, i.e. every transaction that held an xid at step 2
#    has committed or rolled back.
#
# X is not a snapshot's xmax: that is one past the newest *completed* xid, and a transaction newer
# than every completed one is in progress yet listed nowhere in the snapshot (A alone open with xid
# 753 gives the snapshot 753:753:, "nothing in progress"). `age(xid)` in a transaction without an
# xid counts from the next xid, so X = xmax + age(xmax). A snapshot's xmin >= X means xid X - 1 has
# completed (so xmax >= X) and none below it is in progress.
#
# Writers draw their seq only after their transaction has an xid (the seq default
# `caracal_outbox_next_seq()` of migration 0002 assigns the xid first; a subtree cascade draws its
# events' seqs itself, after its UPDATE has assigned it, storage/sessions.py). So each holder of a
# seq <= L got its xid before step 1, hence before step 2: it is below X, and after
# step 3 it has ended. From then on no row with seq <= L can appear, and a read of
# `cursor < seq <= L` sees every one of them that will ever exist (aborted ones never will). Cursors
# are seq values, pages are in seq order: each event of a zone appears exactly once. Seq order
# follows commit order for conflicting writers (a writer that waits on another's row lock draws its
# seq after that one committed).
#
# Step 3 waits for the transactions open at step 2; they are short (an activity's transaction), so
# it costs a few milliseconds. A long-open transaction holds the feed back (never makes it skip):
# the wait is bounded by the caller, who then gets an empty page and retries.

SEQUENCE = "caracal_outbox_seq_seq"
# Every statement that writes events notifies this channel at its commit, once per zone, with the
# zone id as the payload (the trigger of migration 0012): a reader of that zone reads again.
FEED_CHANNEL = "event_feed"
MAX_LIMIT = 500
# The xmin of a snapshot and the next xid (see above), as xid8 text; the pooled connections run in
# autocommit, so this statement's transaction has no xid of its own.
_NEXT_XID_SQL = """
    SELECT pg_snapshot_xmin(s)::text AS xmin,
           (pg_snapshot_xmax(s)::text::bigint
            + age((pg_snapshot_xmax(s)::text::bigint % 4294967296)::text::xid))::text AS next_xid
    FROM pg_current_snapshot() AS s"""
_GATE_FIRST_SLEEP = 0.002
_GATE_MAX_SLEEP = 0.05


async def stable_horizon(db: Database, timeout: float) -> int | None:
    """The greatest H such that no row with seq <= H can still appear; None if the transactions
    open right now did not all end within `timeout` seconds."""
    async with db.connection() as conn:
        cur = await conn.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS last FROM {SEQUENCE}")
        last = int(one(await cur.fetchone())["last"])
        # A separate statement: the next xid is read after the sequence was.
        cur = await conn.execute(_NEXT_XID_SQL)
        snap = one(await cur.fetchone())
    if int(snap["xmin"]) >= int(snap["next_xid"]):
        return last  # no transaction held an xid
    xmax = snap["next_xid"]
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


def feed_listener(url: str, *, on_zone: Callable[[str], None], on_connect: Callable[[], None],
                  on_lost: Callable[[Exception], None]) -> ChannelListener:
    """A LISTEN connection on FEED_CHANNEL: `on_zone(zone_id)` for each notification."""
    return ChannelListener(url, FEED_CHANNEL, on_notify=on_zone, on_connect=on_connect, on_lost=on_lost)


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
