"""Workflow outbox: Postgres decides, Temporal follows (DESIGN.md).

Every command transaction writes one `workflow_outbox` row per workflow that must hear of its
change (signal name, payload with the entity's state at its state_version, and what is needed to
start the workflow when it is not running). Dispatchers deliver the rows with signal-with-start,
in `seq` order per workflow, and delete them. `workflow_dispatchers` holds each dispatcher's
delivery counters (read by /ready and /metrics); `coordinator_counters` holds totals such as the
reconciler's starts.

Revision ID: 0003_workflow_outbox
Revises: 0002_outbox_feed
"""
from alembic import op

revision = "0003_workflow_outbox"
down_revision = "0002_outbox_feed"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE workflow_outbox (
    seq bigserial PRIMARY KEY,
    workflow_id text NOT NULL,
    workflow_type text NOT NULL,
    signal text NOT NULL,
    payload jsonb NOT NULL,
    start_args jsonb NOT NULL,
    search_attributes jsonb NOT NULL DEFAULT '{}'::jsonb,
    summary text NOT NULL DEFAULT '',
    -- The writer's task queue (Database(task_queue=...) sets the GUC on its connections); '' = the
    -- dispatcher's own. Lets processes on different queues share one database (the tests do).
    task_queue text NOT NULL DEFAULT COALESCE(current_setting('coordinator.task_queue', true), ''),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);
-- Per-workflow order (a row is deliverable only when no earlier row of its workflow is left).
CREATE INDEX workflow_outbox_workflow_seq ON workflow_outbox (workflow_id, seq);

CREATE TABLE workflow_dispatchers (
    dispatcher_id text PRIMARY KEY,
    delivered bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    rate_per_s double precision NOT NULL DEFAULT 0,
    lag_p50_ms double precision,
    lag_p95_ms double precision,
    temporal_ok boolean NOT NULL DEFAULT true,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE coordinator_counters (
    name text PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS coordinator_counters;
DROP TABLE IF EXISTS workflow_dispatchers;
DROP TABLE IF EXISTS workflow_outbox;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
