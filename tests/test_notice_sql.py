"""SQL renderings of Python rules, held to them: a cascade's fan-out row (`fanout_sql`), once spread
(`spread_fanouts_sql`, which renders `session_notice_sql`), writes what `session_notice` and
`enqueue` write for the same row, and `NEW_ID_SQL` (a cascade's event ids) mints ids like
`rules.ids.new_id`."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from rules import workflow_contract as wc
from rules.ids import new_id
from rules.lifecycle import DEFAULT_TASK_TTL_SECONDS
from storage.event_feed import NEW_ID_SQL
from storage.notices import SNAPSHOT_TYPES, _due_at, fanout_sql, session_notice, spread_fanouts_sql

T0 = datetime(2026, 11, 30, 9, 0, 1, 123456, tzinfo=timezone.utc)
NOW = datetime.now(timezone.utc).replace(microsecond=987654)


def row(**over):
    base = {"id": "s1", "zone_id": "z", "application_id": "app-1", "lifecycle": "task", "status": "suspended",
            "state_version": 3, "parent_id": "p1", "root_id": "r1", "started_at": T0, "ttl_seconds": 60,
            "heartbeat_deadline_at": None, "lease_generation": 0, "termination_reason": None}
    return {**base, **over}


CASES = [
    ("suspended task with a parent", row(), wc.SESSION_SUSPENDED, "requested"),
    ("active root task, default TTL", row(status="active", parent_id=None, root_id="s1", ttl_seconds=None,
                                          started_at=NOW), wc.SESSION_RESUMED, None),
    ("task with TTL 0", row(status="active", ttl_seconds=0, started_at=NOW), wc.SESSION_RESUMED, None),
    ("active service", row(lifecycle="service", status="active", ttl_seconds=None, lease_generation=2,
                           heartbeat_deadline_at=NOW + timedelta(seconds=30)), wc.SESSION_RESUMED, None),
    ("suspended service", row(lifecycle="service", heartbeat_deadline_at=NOW - timedelta(seconds=5),
                              lease_generation=3), wc.SESSION_SUSPENDED, "service_heartbeat_lost"),
    ("ended task keeps its own reason", row(status="terminated", termination_reason="parent_terminated"),
     wc.SESSION_TERMINATED, "requested"),
]


@pytest.mark.parametrize("name,session,signal,reason", CASES, ids=[c[0] for c in CASES])
def test_sql_rendering_matches_session_notice(postgres, name, session, signal, reason):
    summary = f"{signal} with the subtree of r1" + (f" ({reason})" if reason else "")
    notice = session_notice(session, signal, summary, reason=reason)
    expected = {"workflow_id": notice.workflow_id, "workflow_type": notice.workflow_type, "signal": notice.signal,
                "payload": notice.payload, "start_args": notice.start_args,
                "search_attributes": notice.search_attributes, "summary": notice.summary,
                "due_at": _due_at(notice.payload)}
    with psycopg.connect(postgres.url("coordinator"), row_factory=dict_row) as conn:
        conn.execute("CREATE TEMP TABLE t (LIKE sessions INCLUDING DEFAULTS)")
        conn.execute("""INSERT INTO t (id, zone_id, application_id, lifecycle, status, state_version, parent_id,
                            root_id, started_at, ttl_seconds, heartbeat_deadline_at, lease_generation,
                            termination_reason, subject_authority_record_id)
                        VALUES (%(id)s, %(zone_id)s, %(application_id)s, %(lifecycle)s, %(status)s,
                                %(state_version)s, %(parent_id)s, %(root_id)s, %(started_at)s, %(ttl_seconds)s,
                                %(heartbeat_deadline_at)s, %(lease_generation)s, %(termination_reason)s, 'ar')""",
                     session)
        queue = f"notice-sql-{uuid.uuid4().hex[:8]}"
        conn.execute("SELECT set_config('coordinator.task_queue', %s, true)", (queue,))
        conn.execute(f"""WITH changed AS (SELECT * FROM t), notices AS ({fanout_sql("changed", "c.id")})
                         SELECT count(*) FROM notices""", {"signal": signal, "summary": summary, "reason": reason})
        spread = conn.execute(spread_fanouts_sql(), {"queue": queue, "limit": 100,
                                                     "default_ttl": DEFAULT_TASK_TTL_SECONDS}).fetchone()
        got = conn.execute("""SELECT workflow_id, workflow_type, signal, payload, start_args, search_attributes,
                                     summary, due_at, task_queue
                              FROM workflow_outbox WHERE task_queue = %s""", (queue,)).fetchall()
        conn.rollback()
    assert spread["n"] >= 1 and len(got) == 1, got
    got = got[0]
    assert got.pop("task_queue") == queue
    due = got.pop("due_at")
    assert (due.isoformat(timespec="milliseconds").replace("+00:00", "Z") if due else None) == expected.pop("due_at")
    assert got == expected


def test_sql_ids_are_uuid7_like_new_id(postgres):
    with psycopg.connect(postgres.url("coordinator")) as conn:
        before_ms = int(time.time() * 1000)
        ids = [r[0] for r in conn.execute(f"SELECT {NEW_ID_SQL} FROM generate_series(1, 50)").fetchall()]
        after_ms = int(time.time() * 1000)
    python_id = new_id()
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and len(text) == len(python_id)
        assert parsed.version == 7 == uuid.UUID(python_id).version and parsed.variant == uuid.RFC_4122
        assert before_ms - 5 <= parsed.int >> 80 <= after_ms + 5  # the first 48 bits: Unix time in ms
    assert len(set(ids)) == len(ids)


def test_the_fanout_session_type_holds_every_snapshot_column(postgres):
    """`workflow_outbox_session` (migration 0008) is what `fanout_sql` and `spread_fanouts_sql` read
    and write by name: the outbox seq, then SNAPSHOT_COLUMNS with their types."""
    with psycopg.connect(postgres.url("coordinator")) as conn:
        attributes = conn.execute("""
            SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
            JOIN pg_type t ON t.typrelid = a.attrelid
            WHERE t.typname = 'workflow_outbox_session' AND a.attnum > 0 ORDER BY a.attnum""").fetchall()
    kinds = {"timestamptz": "timestamp with time zone"}
    assert attributes == [("outbox_seq", "bigint"), *((name, kinds.get(kind, kind))
                                                      for name, kind in SNAPSHOT_TYPES.items())]
