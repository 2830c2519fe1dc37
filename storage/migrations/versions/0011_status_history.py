"""Status history of sessions and delegation edges, and the bulk revocation record.

`status_history` holds one row per status a session or an edge took: at its insert and at every
update that changes it, written by statement-level triggers in the transaction that makes the
change (expiry settlements included), so no path can skip it. `actor` and `reason` come from the
transaction's `coordinator.actor` / `coordinator.change_reason` settings where the command set them
(storage/history.py); a session's termination reason wins for its end. Rows older than the
retention window are deleted by retention; the window never reaches before `status_history_start`
(rows for what existed then are written here, at that instant).

`bulk_revocations`: the audit record of each bulk revoke (its filter, counts and answer); its
receipts (Idempotency-Key) are a new operation of `coordinator_idempotency_receipts` naming the record.

Revision ID: 0011_status_history
Revises: 0010_follow_lag_histogram
"""
from alembic import op

revision = "0011_status_history"
down_revision = "0010_follow_lag_histogram"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE status_history (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    zone_id text NOT NULL,
    entity text NOT NULL CHECK (entity IN ('session', 'edge')),
    entity_id text NOT NULL,
    status text NOT NULL,
    previous_status text NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    actor text NULL,
    reason text NULL
);
CREATE INDEX status_history_entity ON status_history (entity_id, changed_at DESC, seq DESC);
CREATE INDEX status_history_changed_at ON status_history (changed_at);

CREATE TABLE status_history_start (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    started_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO status_history_start DEFAULT VALUES;

CREATE FUNCTION status_history_actor() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT NULLIF(current_setting('coordinator.actor', true), '') $$;
CREATE FUNCTION status_history_reason() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT NULLIF(current_setting('coordinator.change_reason', true), '') $$;

CREATE FUNCTION record_session_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO status_history (zone_id, entity, entity_id, status, actor, reason)
        SELECT n.zone_id, 'session', n.id, n.status, status_history_actor(), 'started' FROM new_rows n;
    ELSE
        INSERT INTO status_history (zone_id, entity, entity_id, status, previous_status, actor, reason)
        SELECT n.zone_id, 'session', n.id, n.status, o.status, status_history_actor(),
               CASE WHEN n.status IN ('terminated', 'expired') THEN COALESCE(n.termination_reason, n.status)
                    ELSE COALESCE(status_history_reason(), n.status) END
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION record_edge_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO status_history (zone_id, entity, entity_id, status, actor, reason)
        SELECT n.zone_id, 'edge', n.id, n.status, status_history_actor(), 'created' FROM new_rows n;
    ELSE
        INSERT INTO status_history (zone_id, entity, entity_id, status, previous_status, actor, reason)
        SELECT n.zone_id, 'edge', n.id, n.status, o.status, status_history_actor(),
               COALESCE(status_history_reason(), n.status)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER sessions_status_insert AFTER INSERT ON sessions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION record_session_status();
CREATE TRIGGER sessions_status_update AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION record_session_status();
CREATE TRIGGER delegation_edges_status_insert AFTER INSERT ON delegation_edges
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION record_edge_status();
CREATE TRIGGER delegation_edges_status_update AFTER UPDATE ON delegation_edges
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION record_edge_status();

INSERT INTO status_history (zone_id, entity, entity_id, status, reason)
SELECT zone_id, 'session', id, status, 'recorded at history start' FROM sessions;
INSERT INTO status_history (zone_id, entity, entity_id, status, reason)
SELECT zone_id, 'edge', id, status, 'recorded at history start' FROM delegation_edges;

CREATE TABLE bulk_revocations (
    id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    actor text NULL,
    filter_json jsonb NOT NULL,
    counts_json jsonb NOT NULL,
    answer_json jsonb NULL,  -- the real call's answer (a receipt's body may not hold 1,000s of edge ids)
    epoch_before bigint NOT NULL,
    epoch_after bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bulk_revocations_zone ON bulk_revocations (zone_id, created_at DESC);

ALTER TABLE coordinator_idempotency_receipts DROP CONSTRAINT coordinator_idempotency_receipts_operation_check,
    ADD CONSTRAINT coordinator_idempotency_receipts_operation_check CHECK (operation IN (
        'session.start.v2', 'delegation.create.v2', 'invocation.create.v2', 'delegation.bulk_revoke.v1'));
""")


def downgrade() -> None:
    op.execute("""
DELETE FROM coordinator_idempotency_receipts WHERE operation = 'delegation.bulk_revoke.v1';
ALTER TABLE coordinator_idempotency_receipts DROP CONSTRAINT coordinator_idempotency_receipts_operation_check,
    ADD CONSTRAINT coordinator_idempotency_receipts_operation_check CHECK (operation IN (
        'session.start.v2', 'delegation.create.v2', 'invocation.create.v2'));
DROP TABLE bulk_revocations;
DROP TRIGGER delegation_edges_status_update ON delegation_edges;
DROP TRIGGER delegation_edges_status_insert ON delegation_edges;
DROP TRIGGER sessions_status_update ON sessions;
DROP TRIGGER sessions_status_insert ON sessions;
DROP FUNCTION record_edge_status();
DROP FUNCTION record_session_status();
DROP FUNCTION status_history_reason();
DROP FUNCTION status_history_actor();
DROP TABLE status_history_start;
DROP TABLE status_history;
""")
