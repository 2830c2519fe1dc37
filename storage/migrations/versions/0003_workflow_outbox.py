"""Workflow outbox: Postgres decides, Temporal follows (docs/DESIGN.md).

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
    -- The entity's next deadline (TTL, lease, invocation deadline) as of this notice: heads due
    -- soon are delivered before older rows, so a backlog never makes a timer late.
    due_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);
-- Per-workflow order (a row is deliverable only when no earlier row of its workflow is left).
CREATE INDEX workflow_outbox_workflow_seq ON workflow_outbox (workflow_id, seq);
CREATE INDEX workflow_outbox_due ON workflow_outbox (due_at) WHERE due_at IS NOT NULL;

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

-- Live (active or suspended) sessions per zone and application: an upper bound of the
-- "capacity-live" count (which also leaves out lapsed, not yet settled sessions), so a start under
-- every limit needs no count of the zone's sessions; only a start near a limit counts exactly.
CREATE TABLE session_capacity (
    zone_id text NOT NULL,
    application_id text NOT NULL,
    live integer NOT NULL DEFAULT 0,
    PRIMARY KEY (zone_id, application_id)
);
INSERT INTO session_capacity (zone_id, application_id, live)
SELECT zone_id, application_id, count(*) FROM sessions WHERE status IN ('active', 'suspended')
GROUP BY zone_id, application_id;

-- Kept by statement triggers, whoever writes `sessions` (one upsert per statement and application,
-- however many rows the statement changed).
CREATE FUNCTION session_capacity_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS (
        SELECT zone_id, application_id, 1 AS d FROM new_rows WHERE status IN ('active', 'suspended')
        UNION ALL
        SELECT zone_id, application_id, -1 FROM old_rows WHERE status IN ('active', 'suspended')
    ), delta AS (
        SELECT zone_id, application_id, sum(d)::int AS d FROM moved GROUP BY zone_id, application_id
        HAVING sum(d) <> 0
    )
    INSERT INTO session_capacity AS c (zone_id, application_id, live)
    SELECT zone_id, application_id, d FROM delta
    ON CONFLICT (zone_id, application_id) DO UPDATE SET live = GREATEST(c.live + EXCLUDED.live, 0);
    RETURN NULL;
END
$$;
CREATE FUNCTION session_capacity_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_capacity AS c (zone_id, application_id, live)
    SELECT zone_id, application_id, count(*) FROM new_rows WHERE status IN ('active', 'suspended')
    GROUP BY zone_id, application_id
    ON CONFLICT (zone_id, application_id) DO UPDATE SET live = c.live + EXCLUDED.live;
    RETURN NULL;
END
$$;
CREATE FUNCTION session_capacity_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE session_capacity c SET live = GREATEST(c.live - x.n, 0)
    FROM (SELECT zone_id, application_id, count(*)::int AS n FROM old_rows WHERE status IN ('active', 'suspended')
          GROUP BY zone_id, application_id) x
    WHERE c.zone_id = x.zone_id AND c.application_id = x.application_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER sessions_capacity_insert AFTER INSERT ON sessions REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_capacity_insert();
CREATE TRIGGER sessions_capacity_update AFTER UPDATE ON sessions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_capacity_apply();
CREATE TRIGGER sessions_capacity_delete AFTER DELETE ON sessions REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_capacity_delete();

CREATE TABLE coordinator_counters (
    name text PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS coordinator_counters;
DROP TRIGGER IF EXISTS sessions_capacity_insert ON sessions;
DROP TRIGGER IF EXISTS sessions_capacity_update ON sessions;
DROP TRIGGER IF EXISTS sessions_capacity_delete ON sessions;
DROP FUNCTION IF EXISTS session_capacity_apply();
DROP FUNCTION IF EXISTS session_capacity_insert();
DROP FUNCTION IF EXISTS session_capacity_delete();
DROP TABLE IF EXISTS session_capacity;
DROP TABLE IF EXISTS workflow_dispatchers;
DROP TABLE IF EXISTS workflow_outbox;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
