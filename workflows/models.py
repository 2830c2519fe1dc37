"""Payloads exchanged between the API, the workflows and the activities.

Plain dataclasses of JSON-friendly fields (times are ISO strings), so histories stay readable in
the Temporal UI and replay without any third-party converter. Only the standard library here:
workflow modules import this file inside the sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASK_QUEUE = "coordinator"

# Activity names (the workflows refer to activities by name so they never import I/O code).
START_SESSION = "start_session"
SUSPEND_SESSION = "suspend_session"
RESUME_SESSION = "resume_session"
TERMINATE_SESSION = "terminate_session"
SETTLE_SESSION_DEADLINE = "settle_session_deadline"
TAKE_SESSION_LEASE = "take_session_lease"
CREATE_DELEGATION = "create_delegation"
REVOKE_DELEGATION = "revoke_delegation"
NOTIFY_SESSIONS = "notify_sessions"
CREATE_INVOCATION = "create_invocation"
TRANSITION_INVOCATION = "transition_invocation"
SETTLE_INVOCATION_DEADLINE = "settle_invocation_deadline"
RUN_MAINTENANCE = "run_maintenance"

SESSION_WORKFLOW = "Session"
INVOCATION_WORKFLOW = "Invocation"
MAINTENANCE_WORKFLOW = "Maintenance"


def session_workflow_id(zone_id: str, session_id: str) -> str:
    return f"session/{zone_id}/{session_id}"


def invocation_workflow_id(zone_id: str, invocation_id: str) -> str:
    return f"invocation/{zone_id}/{invocation_id}"


@dataclass
class SessionChange:
    """A status change of one session, told to its workflow by the session that caused it."""

    session_id: str
    status: str
    state_version: int
    reason: str | None = None
    heartbeat_deadline_at: str | None = None


@dataclass
class Outcome:
    """What a state-changing activity did.

    `error` is a rejected command (`[status, body]`, nothing written); otherwise `status`/`body`
    is the HTTP answer, `session` the caller's own new state and `changes` the other sessions
    whose workflows must be told.
    """

    status: int = 200
    body: dict[str, Any] | None = None
    error: list[Any] | None = None
    replayed: bool = False
    session: dict[str, Any] | None = None
    changes: list[SessionChange] = field(default_factory=list)
    zone_changes: dict[str, list[SessionChange]] = field(default_factory=dict)


@dataclass
class StartSessionCommand:
    zone_id: str
    session_id: str
    application_id: str
    authority_record_id: str
    parent_id: str | None
    lifecycle: str
    labels: list[str]
    ttl_seconds: int | None
    parent_authority: str
    inherit_parent_edge_id: str | None
    metadata: dict[str, Any]
    caller_client_id: str
    caller_scopes: list[str]
    idempotency_key: str | None = None
    idempotency_digest_hex: str | None = None
    idempotency_generated: bool = False


@dataclass
class SessionCommand:
    """suspend / resume / terminate / settle / lease on one session."""

    zone_id: str
    session_id: str
    op_id: str = ""
    reason: str | None = None
    lease_generation: int | None = None
    lease_required: bool = False


@dataclass
class NotifyCommand:
    zone_id: str
    changes: list[SessionChange]


@dataclass
class SessionState:
    """Everything a session workflow carries across continue-as-new."""

    zone_id: str
    session_id: str
    application_id: str = ""
    lifecycle: str = "task"
    status: str = "creating"
    state_version: int = 0
    parent_id: str | None = None
    root_id: str | None = None
    expires_at: str | None = None  # task TTL deadline
    heartbeat_deadline_at: str | None = None  # service lease deadline
    runs: int = 1
    pending_changes: list[SessionChange] = field(default_factory=list)


@dataclass
class CreateInvocationCommand:
    zone_id: str
    invocation_id: str
    service_id: str
    source_session_id: str | None
    target_session_id: str | None
    method: str
    params: Any
    metadata: dict[str, Any]
    timeout_ms: int
    retry_policy: dict[str, int]
    scope_id: str
    idempotency_key: str
    idempotency_digest_hex: str


@dataclass
class InvocationCommand:
    """start / cancel / complete / settle on one invocation."""

    zone_id: str
    invocation_id: str
    action: str = ""
    op_id: str = ""
    reason: str | None = None
    status: str | None = None
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class InvocationOutcome:
    status: int = 200
    body: dict[str, Any] | None = None
    error: list[Any] | None = None
    replayed: bool = False
    invocation: dict[str, Any] | None = None


@dataclass
class InvocationState:
    zone_id: str
    invocation_id: str
    service_id: str = ""
    status: str = "creating"
    attempts: int = 0
    max_attempts: int = 1
    deadline_at: str | None = None
    state_version: int = 0
    runs: int = 1


@dataclass
class DelegateCommand:
    """A delegation create after the API's request checks; runs on the source session's workflow."""

    zone_id: str
    edge_id: str
    source_session_id: str
    target_session_id: str
    issuer_application_id: str
    receiver_application_id: str
    parent_edge_id: str | None
    resource_id: str | None
    scopes: list[str]
    constraints: dict[str, Any]
    requested_expires_at: str | None
    ttl_seconds: int | None
    body_ttl_seconds: int | None
    broad: bool
    idempotency_key: str | None = None
    idempotency_digest_hex: str | None = None
    op_id: str = ""


@dataclass
class RevokeCommand:
    zone_id: str
    session_id: str  # the edge's source session, whose workflow runs the revoke
    edge_id: str
    expected_epoch: int | None = None
    op_id: str = ""
