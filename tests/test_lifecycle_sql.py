"""rules/lifecycle.py holds each rule twice, in Python and in SQL: here both forms answer the same
for the same rows, on a real Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from rules import lifecycle

NOW = datetime.now(timezone.utc)
HOUR = timedelta(hours=1)

# (lifecycle, status, started_at, ttl_seconds, heartbeat_deadline_at)
SESSIONS = [
    (kind, status, started, ttl, lease)
    for kind in lifecycle.LIFECYCLES
    for status in lifecycle.SESSION_STATUSES
    for started, ttl in ((NOW, None), (NOW - 2 * HOUR, None), (NOW, 0), (NOW, 60), (NOW - HOUR, 60))
    for lease in (None, NOW + HOUR, NOW - HOUR)
]


def _session_sql(conn: psycopg.Connection, row: tuple) -> dict:
    kind, status, started, ttl, lease = row
    return conn.execute(f"""
        SELECT {lifecycle.task_expires_at_sql("s")} AS expires_at, {lifecycle.session_deadline_sql("s")} AS deadline,
               {lifecycle.ttl_due_sql("s")} AS ttl_due, {lifecycle.lease_due_sql("s")} AS lease_due,
               s.status IN {lifecycle.SESSION_LIVE_SQL} AS live, s.status IN {lifecycle.SESSION_TERMINAL_SQL} AS ended
        FROM (SELECT %s::text AS lifecycle, %s::text AS status, %s::timestamptz AS started_at,
                     %s::int AS ttl_seconds, %s::timestamptz AS heartbeat_deadline_at) s""",
                        (kind, status, started, ttl, lease)).fetchone()


def test_session_rules_agree(postgres):
    with psycopg.connect(postgres.url("coordinator"), row_factory=dict_row) as conn:
        for row in SESSIONS:
            kind, status, started, ttl, lease = row
            got = _session_sql(conn, row)
            expires = lifecycle.task_expires_at(kind, started, ttl)
            what, deadline = lifecycle.session_deadline(kind, status, expires, lease)
            assert got["expires_at"] == expires, row
            assert got["deadline"] == deadline, row
            now = conn.execute("SELECT now() AS t").fetchone()["t"]
            assert bool(got["ttl_due"]) is (what == lifecycle.TTL_EXPIRY and deadline <= now), row
            assert bool(got["lease_due"]) is (what == lifecycle.LEASE_DEADLINE and deadline <= now), row
            assert got["live"] is (status in lifecycle.SESSION_LIVE), row
            assert got["ended"] is (status in lifecycle.SESSION_TERMINAL), row


def test_an_explicit_ttl_of_zero_expires_at_the_start():
    assert lifecycle.task_expires_at("task", NOW, 0) == NOW
    assert lifecycle.task_expires_at("task", NOW, None) == NOW + timedelta(seconds=lifecycle.DEFAULT_TASK_TTL_SECONDS)
    assert lifecycle.task_expires_at("service", NOW, 60) is None


INVOCATION_STATUSES = ("pending", "running", "cancel_requested", "failed", *lifecycle.INVOCATION_FINAL)


@pytest.mark.parametrize("status", INVOCATION_STATUSES)
def test_invocation_rules_agree(postgres, status):
    with psycopg.connect(postgres.url("coordinator"), row_factory=dict_row) as conn:
        for attempts, max_attempts in ((1, 3), (3, 3)):
            deadline_at = NOW + HOUR
            got = conn.execute(f"""
                SELECT {lifecycle.invocation_finished_sql("x")} AS finished,
                       {lifecycle.invocation_deadline_sql("x")} AS deadline
                FROM (SELECT %s::text AS status, %s::int AS attempts, %s::int AS max_attempts,
                             %s::timestamptz AS deadline_at) x""",
                               (status, attempts, max_attempts, deadline_at)).fetchone()
            assert got["finished"] is lifecycle.invocation_finished(status, attempts, max_attempts)
            assert got["deadline"] == lifecycle.invocation_deadline(status, deadline_at)
