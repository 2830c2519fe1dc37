"""Sessions and events keep only the indexes a query uses, keyed so that a lookup by id stays one.

A status change cannot be a HOT update (status is in an index predicate), so Postgres writes an
entry into every index of `sessions` for each changed row: a 200-session suspend wrote 1,800. Four
indexes no query needs go:

- `sessions_zone_id_desc` (zone_id, id DESC): `sessions_zone_id_id_key` (zone_id, id) serves the
  same scans backwards;
- `sessions_zone_parent_status`: subtree walks and the parent filter use `sessions_parent`, which
  also serves the foreign key from `parent_id` when a session is deleted;
- `sessions_active_last_active` and `sessions_service_deadline`: nothing scans by `last_active_at`
  or by lease deadline (lease and TTL deadlines are workflow timers, settled row by row). Without
  them a heartbeat (it moves both columns) no longer touches any index, so it can be a HOT update;
  the lower fill factor leaves new pages room for that.

`sessions_zone_live` becomes (zone_id, id) over the live sessions. Keyed (zone_id, application_id)
it was the planner's pick for every "this id in this zone, active" lookup while the table had no
statistics yet (a fresh deployment's first minute, until autovacuum analyses it): the smallest
index matching the zone, read in full and filtered by id (4 ms for a delegation's two endpoints in
a zone of 5,000 sessions). With the id in the key the same choice is a direct lookup. It still
serves the exact capacity count, which reads the zone's live sessions.

`caracal_outbox_topic_status` goes too: no query filters events by topic without the zone (the
feed reads by (zone_id, seq)), and every event, 201 for a 200-descendant cascade, paid for it.

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
CREATE INDEX sessions_zone_live ON sessions (zone_id, id) WHERE status IN ('active', 'suspended');
ALTER TABLE sessions SET (fillfactor = 85);
DROP INDEX IF EXISTS caracal_outbox_topic_status;
"""

DOWNGRADE = r"""
CREATE INDEX IF NOT EXISTS caracal_outbox_topic_status ON caracal_outbox (topic, status);
ALTER TABLE sessions RESET (fillfactor);
DROP INDEX IF EXISTS sessions_zone_live;
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
