"""`workflow_outbox_fanout`: a subtree cascade's notices as one row, spread by the dispatcher.

A suspend or resume of a 200-session subtree wrote 201 `workflow_outbox` rows in the command's
statement: 201 JSON notices rendered, 201 heap rows and three index entries each, about a third of
the statement's time. Now it writes one row here: the changed sessions' columns as one array of
`workflow_outbox_session` (each with the outbox `seq` it takes; binary, uncompressed: JSON text
and its compression cost more than the rows it replaced), the signal, the summary and the reason.
A dispatcher turns it into the 201 outbox rows before it claims (storage/notice_dispatch.py
`spread_fanouts`), with the same notices `session_notice_sql` rendered in the command before.

Order per workflow holds: each session's notice keeps the `seq` drawn in the command, and no
outbox row behind the first `seq` of a fan-out row is claimed until that row is spread.

Revision ID: 0008_workflow_outbox_fanout
Revises: 0007_sql_refusal
"""
from alembic import op

revision = "0008_workflow_outbox_fanout"
down_revision = "0007_sql_refusal"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- A session as a fan-out row keeps it: storage/notices.py SNAPSHOT_COLUMNS and its seq.
CREATE TYPE workflow_outbox_session AS (
    outbox_seq bigint, id text, zone_id text, application_id text, lifecycle text, status text,
    state_version bigint, parent_id text, root_id text, started_at timestamptz, ttl_seconds integer,
    heartbeat_deadline_at timestamptz, lease_generation integer, termination_reason text
);
CREATE TABLE workflow_outbox_fanout (
    -- The first of its sessions' outbox seqs (drawn from workflow_outbox's sequence): its place.
    seq bigint PRIMARY KEY,
    signal text NOT NULL,
    summary text NOT NULL,
    reason text,
    -- The changed sessions, in notice order.
    sessions workflow_outbox_session[] NOT NULL,
    task_queue text NOT NULL DEFAULT COALESCE(current_setting('coordinator.task_queue', true), ''),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Stored out of line as it is: compressing tens of kilobytes costs the command more than writing them.
ALTER TABLE workflow_outbox_fanout ALTER COLUMN sessions SET STORAGE EXTERNAL;
"""

DOWNGRADE = r"""
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM workflow_outbox_fanout) THEN
        RAISE EXCEPTION 'workflow_outbox_fanout holds notices: run a dispatcher until it is empty first';
    END IF;
END $$;
DROP TABLE IF EXISTS workflow_outbox_fanout;
DROP TYPE IF EXISTS workflow_outbox_session;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
