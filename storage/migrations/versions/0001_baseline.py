"""Baseline schema: reference-behaviour §1 (renamed tables of dd3e13005 plus the receipts table),
and what our design adds: zones, lease generation, per-row state versions, operation results for
at-least-once activities, an O(1) audit chain head, an ordered outbox.

Revision ID: 0001_baseline
Revises:
"""
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TABLE zones (
    id text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Directory: ours to keep (docs/DESIGN.md "Directory and credentials").
CREATE TABLE applications (
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    id text NOT NULL,
    registration_method text NOT NULL DEFAULT 'managed'
        CHECK (registration_method IN ('managed', 'dcr')),
    archived_at timestamptz NULL,
    expires_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (zone_id, id),
    CHECK (registration_method <> 'dcr' OR expires_at IS NOT NULL)
);

CREATE TABLE resources (
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    id text NOT NULL,
    identifier text NOT NULL,
    scopes text[] NOT NULL DEFAULT '{}',
    archived_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (zone_id, id)
);
CREATE UNIQUE INDEX resources_identifier_live ON resources (zone_id, identifier) WHERE archived_at IS NULL;

CREATE TABLE authority_records (
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    id text NOT NULL,
    session_type text NOT NULL CHECK (session_type IN ('user', 'application')),
    subject_id text NOT NULL,
    parent_id text NULL,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'expired')),
    expires_at timestamptz NOT NULL,
    authenticated_at timestamptz NULL,
    claims_json jsonb NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz NULL,
    revoked_reason text NULL,
    PRIMARY KEY (zone_id, id)
);

-- Coordinator sessions (old name agent_sessions).
CREATE TABLE sessions (
    id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    application_id text NOT NULL,
    parent_id text NULL REFERENCES sessions(id),
    root_id text NOT NULL,
    subject_authority_record_id text NOT NULL,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'terminated', 'expired')),
    depth int NOT NULL DEFAULT 0,
    labels text[] NOT NULL DEFAULT '{}',
    max_children int NOT NULL DEFAULT 10,
    child_count int NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_active_at timestamptz NOT NULL DEFAULT now(),
    terminated_at timestamptz NULL,
    ttl_seconds int NULL DEFAULT 3600,
    metadata_json jsonb NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    lifecycle text NOT NULL DEFAULT 'task' CHECK (lifecycle IN ('task', 'service')),
    last_heartbeat_at timestamptz NULL,
    heartbeat_deadline_at timestamptz NULL,
    termination_reason text NULL,
    -- Lease fencing token (sdk-wire-contract §9): 0 for tasks, >= 1 for services.
    lease_generation int NOT NULL DEFAULT 0,
    -- Bumped on every status change: orders the cascade signals a workflow receives and makes
    -- every transition's outbox dedupe key unique.
    state_version bigint NOT NULL DEFAULT 1,
    idempotency_key text NULL,
    UNIQUE (zone_id, id),
    FOREIGN KEY (zone_id, application_id) REFERENCES applications(zone_id, id),
    FOREIGN KEY (zone_id, parent_id) REFERENCES sessions(zone_id, id),
    FOREIGN KEY (zone_id, subject_authority_record_id) REFERENCES authority_records(zone_id, id)
);
CREATE INDEX sessions_active_last_active ON sessions (last_active_at) WHERE status = 'active';
CREATE INDEX sessions_service_deadline ON sessions (heartbeat_deadline_at)
    WHERE status = 'active' AND lifecycle = 'service';
CREATE INDEX sessions_subject ON sessions (subject_authority_record_id);
CREATE INDEX sessions_zone_parent_status ON sessions (zone_id, parent_id, status);
CREATE INDEX sessions_parent ON sessions (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX sessions_zone_id_desc ON sessions (zone_id, id DESC);
CREATE INDEX sessions_zone_live ON sessions (zone_id, application_id) WHERE status IN ('active', 'suspended');

CREATE TABLE agent_topology (
    parent_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    child_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX agent_topology_child ON agent_topology (child_id);

CREATE TABLE agent_services (
    id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    application_id text NOT NULL,
    endpoint_url text NOT NULL,
    protocol_versions text[] NOT NULL DEFAULT '{}',
    framework_name text NULL,
    framework_version text NULL,
    capabilities text[] NOT NULL DEFAULT '{}',
    health text NOT NULL DEFAULT 'starting' CHECK (health IN ('starting', 'healthy', 'degraded', 'unhealthy')),
    metadata_json jsonb NOT NULL DEFAULT '{}',
    last_heartbeat_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (zone_id, id),
    UNIQUE (zone_id, application_id, endpoint_url),
    FOREIGN KEY (zone_id, application_id) REFERENCES applications(zone_id, id) ON DELETE CASCADE
);
CREATE INDEX agent_services_heartbeat ON agent_services (last_heartbeat_at) WHERE health IN ('healthy', 'degraded');
CREATE INDEX agent_services_zone_app ON agent_services (zone_id, application_id);
CREATE INDEX agent_services_zone_health ON agent_services (zone_id, health);

CREATE TABLE agent_invocations (
    id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    service_id text NOT NULL REFERENCES agent_services(id) ON DELETE CASCADE,
    source_session_id text NULL REFERENCES sessions(id) ON DELETE SET NULL,
    target_session_id text NULL REFERENCES sessions(id) ON DELETE SET NULL,
    idempotency_key text NULL,
    method text NOT NULL,
    params_json jsonb NOT NULL DEFAULT '{}',
    metadata_json jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'running', 'succeeded', 'failed', 'cancel_requested', 'canceled', 'timed_out', 'dead')),
    attempts int NOT NULL DEFAULT 0,
    max_attempts int NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    timeout_ms int NOT NULL DEFAULT 30000 CHECK (timeout_ms > 0),
    retry_policy_json jsonb NOT NULL DEFAULT '{}',
    error_json jsonb NULL,
    deadline_at timestamptz NULL,
    cancel_requested_at timestamptz NULL,
    started_at timestamptz NULL,
    completed_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    state_version bigint NOT NULL DEFAULT 1,
    UNIQUE (zone_id, id)
);
CREATE INDEX agent_invocations_deadline ON agent_invocations (deadline_at) WHERE status = 'running';
CREATE INDEX agent_invocations_service ON agent_invocations (zone_id, service_id, status, created_at DESC);
CREATE INDEX agent_invocations_source ON agent_invocations (zone_id, source_session_id, status)
    WHERE source_session_id IS NOT NULL;
CREATE INDEX agent_invocations_target ON agent_invocations (zone_id, target_session_id, status)
    WHERE target_session_id IS NOT NULL;
CREATE INDEX agent_invocations_zone_id_desc ON agent_invocations (zone_id, id DESC);

CREATE TABLE delegation_edges (
    id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    source_session_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    target_session_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    issuer_application_id text NOT NULL,
    receiver_application_id text NOT NULL,
    parent_edge_id text NULL REFERENCES delegation_edges(id) ON DELETE SET NULL,
    resource_id text NULL,
    scopes text[] NOT NULL DEFAULT '{}',
    constraints_json jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'expired')),
    expires_at timestamptz NOT NULL,
    edge_version int NOT NULL DEFAULT 0,
    revoked_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    idempotency_key text NULL,
    CHECK (source_session_id <> target_session_id),
    UNIQUE (zone_id, id),
    FOREIGN KEY (zone_id, issuer_application_id) REFERENCES applications(zone_id, id),
    FOREIGN KEY (zone_id, receiver_application_id) REFERENCES applications(zone_id, id),
    FOREIGN KEY (zone_id, resource_id) REFERENCES resources(zone_id, id)
);
CREATE INDEX delegation_edges_expiry ON delegation_edges (expires_at) WHERE status = 'active';
CREATE INDEX delegation_edges_parent ON delegation_edges (zone_id, parent_edge_id) WHERE parent_edge_id IS NOT NULL;
CREATE INDEX delegation_edges_resource ON delegation_edges (zone_id, resource_id, status) WHERE resource_id IS NOT NULL;
CREATE INDEX delegation_edges_source ON delegation_edges (zone_id, source_session_id, status);
CREATE INDEX delegation_edges_target ON delegation_edges (zone_id, target_session_id, status);
CREATE INDEX delegation_edges_zone_id_desc ON delegation_edges (zone_id, id DESC);
-- Graph walks step from a target to the live edges leaving it.
CREATE INDEX delegation_edges_walk ON delegation_edges (source_session_id, expires_at) WHERE status = 'active';
CREATE INDEX delegation_edges_retention ON delegation_edges ((COALESCE(revoked_at, expires_at, updated_at, created_at)))
    WHERE status IN ('revoked', 'expired');

CREATE TABLE delegation_graph_epochs (
    zone_id text PRIMARY KEY REFERENCES zones(id) ON DELETE CASCADE,
    epoch bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE coordinator_idempotency_receipts (
    id text PRIMARY KEY,
    operation text NOT NULL CHECK (operation IN ('session.start.v2', 'delegation.create.v2', 'invocation.create.v2')),
    zone_id text NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    scope_id text NOT NULL,
    key_digest bytea NOT NULL CHECK (octet_length(key_digest) = 32),
    request_digest bytea NOT NULL CHECK (octet_length(request_digest) = 32),
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    response_status smallint NOT NULL CHECK (response_status BETWEEN 200 AND 299),
    response_json jsonb NOT NULL CHECK (octet_length(response_json::text) <= 65536),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CHECK (expires_at > created_at),
    UNIQUE (operation, zone_id, scope_id, key_digest)
);
CREATE INDEX coordinator_idempotency_receipts_expiry ON coordinator_idempotency_receipts (expires_at, id);
CREATE INDEX coordinator_idempotency_receipts_scope ON coordinator_idempotency_receipts (operation, zone_id, scope_id, expires_at);

-- Outbox: written in the same transaction as the state change. `seq` is assigned at insert;
-- the event feed reads rows in seq order only up to the oldest still-open writer (see storage/event_feed.py).
CREATE TABLE caracal_outbox (
    id text PRIMARY KEY,
    seq bigserial NOT NULL UNIQUE,
    producer text NOT NULL DEFAULT 'coordinator' CHECK (producer IN ('api', 'coordinator')),
    zone_id text NULL,
    topic text NOT NULL,
    dedupe_key text NOT NULL,
    payload_json jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
    attempts int NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (producer, topic, dedupe_key)
);
CREATE INDEX caracal_outbox_status_available ON caracal_outbox (status, available_at);
CREATE INDEX caracal_outbox_topic_status ON caracal_outbox (topic, status);
CREATE INDEX caracal_outbox_zone_seq ON caracal_outbox (zone_id, seq);

CREATE TABLE admin_audit_events (
    id text PRIMARY KEY,
    request_id text NULL,
    actor_id text NULL,
    actor_name text NULL,
    actor_scope text NULL,
    action text NOT NULL,
    method text NOT NULL,
    path text NOT NULL,
    zone_id text NULL,
    entity_type text NULL,
    entity_id text NULL,
    status_code int NOT NULL,
    payload_json jsonb NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    content_sha256 text NOT NULL,
    prev_content_sha256 text NULL,
    chain_hmac text NULL,
    chain_seq bigint NOT NULL
);
CREATE INDEX admin_audit_events_actor ON admin_audit_events (actor_id, occurred_at DESC);
CREATE INDEX admin_audit_events_zone_seq ON admin_audit_events (zone_id, chain_seq DESC);
CREATE INDEX admin_audit_events_request ON admin_audit_events (request_id);
CREATE INDEX admin_audit_events_zone_time ON admin_audit_events (zone_id, occurred_at DESC);

-- O(1) chain head per zone (the reference scans for the greatest chain_seq).
CREATE TABLE admin_audit_heads (
    chain_key text PRIMARY KEY,
    chain_seq bigint NOT NULL,
    content_sha256 text NOT NULL
);

-- Results of applied workflow operations, so an activity retried after its commit returns the
-- same answer instead of applying the transition twice.
CREATE TABLE operation_results (
    op_id text PRIMARY KEY,
    result_json jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operation_results_created ON operation_results (created_at);
"""

TABLES = [
    "operation_results", "admin_audit_heads", "admin_audit_events", "caracal_outbox",
    "coordinator_idempotency_receipts", "delegation_graph_epochs", "delegation_edges",
    "agent_invocations", "agent_services", "agent_topology", "sessions", "authority_records",
    "resources", "applications", "zones",
]


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
