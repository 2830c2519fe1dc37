"""Outbox rows, written inside the transaction of the change they describe (reference §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from rules.ids import new_id
from storage.db import Conn, at_commit, one

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
