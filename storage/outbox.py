"""Outbox rows, written inside the transaction of the change they describe (reference §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from rules.ids import new_id
from storage.db import Conn

AGENTS_LIFECYCLE = "caracal.agents.lifecycle"
SESSIONS_REVOKE = "caracal.sessions.revoke"
INVOCATIONS_LIFECYCLE = "caracal.invocations.lifecycle"
DELEGATIONS_INVALIDATE = "caracal.delegations.invalidate"
TOPICS = (AGENTS_LIFECYCLE, SESSIONS_REVOKE, INVOCATIONS_LIFECYCLE, DELEGATIONS_INVALIDATE)


@dataclass(frozen=True)
class Event:
    topic: str
    dedupe_key: str
    payload: dict[str, Any]


async def emit(conn: Conn, zone_id: str, events: list[Event]) -> None:
    """Insert events in order; a dedupe key already present is skipped (ON CONFLICT DO NOTHING)."""
    if not events:
        return
    await conn.execute(
        """
        INSERT INTO caracal_outbox (id, producer, zone_id, topic, dedupe_key, payload_json)
        SELECT i, 'coordinator', %s, t, k, p
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[]) WITH ORDINALITY AS e(i, t, k, p, n)
        ORDER BY n
        ON CONFLICT (producer, topic, dedupe_key) DO NOTHING
        """,
        (
            zone_id,
            [new_id() for _ in events],
            [e.topic for e in events],
            [e.dedupe_key for e in events],
            [Jsonb(e.payload) for e in events],
        ),
    )


async def bump_epoch(conn: Conn, zone_id: str) -> int:
    """Advance the zone's delegation graph epoch (1 on first use) and return the new value."""
    cur = await conn.execute(
        """
        INSERT INTO delegation_graph_epochs (zone_id, epoch, updated_at) VALUES (%s, 1, now())
        ON CONFLICT (zone_id) DO UPDATE SET epoch = delegation_graph_epochs.epoch + 1, updated_at = now()
        RETURNING epoch
        """,
        (zone_id,),
    )
    row = await cur.fetchone()
    return int(row["epoch"])
