"""Sessions and events keep only the indexes a query uses; suspend, resume and heartbeats become
HOT updates and no longer run the capacity trigger.

Postgres writes an entry into every index of a table for each updated row unless no indexed column
(key or partial-index predicate) changes and the new version fits on its page (a HOT update). A
status change was never one: four indexes named `status`. A 200-session suspend wrote 1,800 index
entries (9 indexes); measured on 201 rows, the UPDATE took 7.8-9.2 ms, and 2.3 ms once no index
touched what it changes.

- `sessions_zone_id_desc` (zone_id, id DESC) goes: `sessions_zone_id_id_key` (zone_id, id) serves
  the same scans backwards.
- `sessions_zone_parent_status` goes: subtree walks and the parent filter use `sessions_parent`,
  which also serves the foreign key from `parent_id` when a session is deleted.
- `sessions_active_last_active` and `sessions_service_deadline` go: nothing scans by
  `last_active_at` or by lease deadline (lease and TTL deadlines are workflow timers, settled row
  by row). A heartbeat moves both columns.
- `sessions_zone_live`, the live sessions of a zone for the exact capacity count, is now keyed
  (zone_id, id) over `terminated_at IS NULL` instead of `status IN ('active', 'suspended')`. A new
  check constraint makes the two the same (every end sets `terminated_at`; nothing clears it), so
  the count reads the same rows, and suspend and resume, which move a session between two live
  statuses, touch no index. The id in the key matters too: while a table has no statistics yet (a
  fresh deployment's first minute, until autovacuum analyses it) the planner took the old
  (zone_id, application_id) index for every "this id in this zone, active" lookup, and read the
  zone's live sessions to find one (4 ms for a delegation's two endpoints among 5,000 sessions).
  The status lookups no longer imply its predicate, so they use the keys by id.
- The lower fill factor leaves new pages room for HOT versions.
- The capacity counter (`session_capacity`, migration 0003) follows a session's end with a row
  trigger on `terminated_at` instead of a statement trigger on every update: by the check
  constraint a session enters or leaves capacity-live exactly when `terminated_at` turns set or
  unset, and the statement trigger copied every updated row into two transition tables (1.1-1.9 ms
  for a 201-session suspend that changes no count; something for every heartbeat).
- `caracal_outbox_topic_status` goes: no query filters events by topic without the zone (the feed
  reads by (zone_id, seq)), and every event paid for it (201 for a 200-descendant cascade).

Revision ID: 0005_lean_indexes
Revises: 0004_scale_out
"""
from alembic import op

revision = "0005_lean_indexes"
down_revision = "0004_scale_out"
branch_labels = None
depends_on = None

UPGRADE = r"""
DROP INDEX IF EXISTS sessions_zone_id_desc;
DROP INDEX IF EXISTS sessions_zone_parent_status;
DROP INDEX IF EXISTS sessions_active_last_active;
DROP INDEX IF EXISTS sessions_service_deadline;
DROP INDEX IF EXISTS sessions_zone_live;
ALTER TABLE sessions ADD CONSTRAINT sessions_ended_iff_terminated_at
    CHECK ((status IN ('active', 'suspended')) = (terminated_at IS NULL));
CREATE INDEX sessions_zone_live ON sessions (zone_id, id) WHERE terminated_at IS NULL;
ALTER TABLE sessions SET (fillfactor = 85);
DROP INDEX IF EXISTS caracal_outbox_topic_status;
DROP TRIGGER IF EXISTS sessions_capacity_update ON sessions;
CREATE FUNCTION session_capacity_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_capacity AS c (zone_id, application_id, live)
    VALUES (NEW.zone_id, NEW.application_id, CASE WHEN NEW.terminated_at IS NULL THEN 1 ELSE 0 END)
    ON CONFLICT (zone_id, application_id) DO UPDATE
        SET live = GREATEST(c.live + CASE WHEN NEW.terminated_at IS NULL THEN 1 ELSE -1 END, 0);
    RETURN NULL;
END
$$;
CREATE TRIGGER sessions_capacity_end AFTER UPDATE OF terminated_at ON sessions
    FOR EACH ROW WHEN ((OLD.terminated_at IS NULL) IS DISTINCT FROM (NEW.terminated_at IS NULL))
    EXECUTE FUNCTION session_capacity_end();
"""

DOWNGRADE = r"""
DROP TRIGGER IF EXISTS sessions_capacity_end ON sessions;
DROP FUNCTION IF EXISTS session_capacity_end();
CREATE TRIGGER sessions_capacity_update AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_capacity_apply();
CREATE INDEX IF NOT EXISTS caracal_outbox_topic_status ON caracal_outbox (topic, status);
ALTER TABLE sessions RESET (fillfactor);
DROP INDEX IF EXISTS sessions_zone_live;
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_ended_iff_terminated_at;
CREATE INDEX sessions_zone_live ON sessions (zone_id, application_id) WHERE status IN ('active', 'suspended');
CREATE INDEX IF NOT EXISTS sessions_service_deadline ON sessions (heartbeat_deadline_at)
    WHERE status = 'active' AND lifecycle = 'service';
CREATE INDEX IF NOT EXISTS sessions_active_last_active ON sessions (last_active_at) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS sessions_zone_parent_status ON sessions (zone_id, parent_id, status);
CREATE INDEX IF NOT EXISTS sessions_zone_id_desc ON sessions (zone_id, id DESC);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
