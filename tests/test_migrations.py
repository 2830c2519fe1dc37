"""Migrations go down and up again, and 0005's index set holds what the queries need."""

from __future__ import annotations

import psycopg
import pytest
from alembic import command

from storage.migrate import alembic_config, head_revision, upgrade

LEAN_SESSION_INDEXES = {"sessions_pkey", "sessions_zone_id_id_key", "sessions_parent", "sessions_subject",
                        "sessions_zone_live"}


def indexes(url: str, table: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (table,)).fetchall()
    return {name: definition for name, definition in rows}


def triggers(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'sessions'::regclass AND NOT tgisinternal")
        return {r[0] for r in rows.fetchall()}


def test_downgrade_to_0004_and_back_to_head(postgres):
    postgres.create_database("migrations_roundtrip")
    url = postgres.url("migrations_roundtrip")
    upgrade(url)
    assert set(indexes(url, "sessions")) == LEAN_SESSION_INDEXES
    assert indexes(url, "sessions")["sessions_zone_live"].endswith("(zone_id, id) WHERE (terminated_at IS NULL)")
    assert "caracal_outbox_topic_status" not in indexes(url, "caracal_outbox")
    assert "sessions_capacity_end" in triggers(url) and "sessions_capacity_update" not in triggers(url)

    command.downgrade(alembic_config(url), "0004_scale_out")
    before = indexes(url, "sessions")
    assert {"sessions_zone_id_desc", "sessions_zone_parent_status", "sessions_active_last_active",
            "sessions_service_deadline"} <= set(before)
    assert "(zone_id, application_id)" in before["sessions_zone_live"]
    assert "caracal_outbox_topic_status" in indexes(url, "caracal_outbox")
    assert "sessions_capacity_update" in triggers(url) and "sessions_capacity_end" not in triggers(url)

    upgrade(url)
    assert set(indexes(url, "sessions")) == LEAN_SESSION_INDEXES
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (head_revision(),)


def test_a_session_lookup_without_statistics_is_keyed_by_id(postgres):
    """A fresh table has no statistics until autovacuum analyses it; the planner's pick for "this id
    in this zone, active" must still reach the row through an index keyed by the id, not scan the
    zone's live sessions (what the old (zone_id, application_id) partial index invited)."""
    postgres.create_database("migrations_plan")
    url = postgres.url("migrations_plan")
    upgrade(url)
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE sessions SET (autovacuum_enabled = off)")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM sessions s WHERE s.zone_id = 'z' AND s.id = ANY(ARRAY['a', 'b'])"
            " AND s.status = 'active'").fetchall())
    assert "Index Cond: ((zone_id = 'z'::text) AND (id = ANY" in plan or "Index Cond: (id = ANY" in plan, plan


def test_a_session_row_ends_exactly_when_it_has_terminated_at(postgres):
    """The check constraint behind `sessions_zone_live`'s predicate: a live status without
    `terminated_at`, an ended one with it."""
    postgres.create_database("migrations_check")
    url = postgres.url("migrations_check")
    upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO zones (id) VALUES ('z')")
        conn.execute("INSERT INTO applications (zone_id, id) VALUES ('z', 'a')")
        conn.execute("INSERT INTO authority_records (zone_id, id, session_type, subject_id, expires_at) "
                     "VALUES ('z', 'r', 'application', 'a', now() + interval '1 hour')")
        conn.execute("INSERT INTO sessions (id, zone_id, application_id, root_id, subject_authority_record_id, status) "
                     "VALUES ('s', 'z', 'a', 's', 'r', 'active')")
        conn.execute("UPDATE sessions SET status = 'suspended' WHERE id = 's'")
        for bad in ("UPDATE sessions SET status = 'terminated' WHERE id = 's'",
                    "UPDATE sessions SET terminated_at = now() WHERE id = 's'"):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(bad)
        conn.execute("UPDATE sessions SET status = 'expired', terminated_at = now() WHERE id = 's'")
