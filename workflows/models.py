"""Payloads the workflows receive (notices, by signal) and exchange with their activities.

Plain dataclasses of JSON-friendly fields (times are ISO strings), so histories stay readable in
the Temporal UI and replay without any third-party converter. The command transactions write the
same shapes as JSON into the workflow outbox (storage/notices.py builds them; a unit test
holds the two together). Only the standard library here: workflow modules import this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rules.workflow_contract import (  # noqa: F401  (re-exported for workflow code and tests)
    INVOCATION_WORKFLOW, MAINTENANCE_WORKFLOW, SESSION_WORKFLOW, TASK_QUEUE, invocation_workflow_id,
    session_workflow_id,
)

# Activity names (the workflows refer to activities by name so they never import I/O code).
SETTLE_SESSION_DEADLINE = "settle_session_deadline"
SETTLE_INVOCATION_DEADLINE = "settle_invocation_deadline"
RUN_MAINTENANCE = "run_maintenance"


@dataclass
class SessionSnapshot:
    """A session's whole state at `state_version`: any one notice brings a workflow up to date."""

    zone_id: str
    session_id: str
    application_id: str
    lifecycle: str
    status: str
    state_version: int
    parent_id: str | None = None
    root_id: str | None = None
    expires_at: str | None = None  # task TTL deadline
    heartbeat_deadline_at: str | None = None  # service lease deadline (moved by heartbeats without notice)
    lease_generation: int = 0
    reason: str | None = None  # why the session is suspended or ended


@dataclass
class SessionNotice:
    """One change told to a session's workflow; the signal's name says which (rules/workflow_contract)."""

    session: SessionSnapshot
    summary: str
    edge_id: str | None = None
    peer_session_id: str | None = None


@dataclass
class SessionNoticeItem:
    """One notice of a `notices` batch: `signal` is the name it would have had on its own."""

    signal: str
    notice: SessionNotice


@dataclass
class SessionState:
    """Everything a session workflow carries across continue-as-new."""

    zone_id: str
    session_id: str
    current: SessionSnapshot | None = None  # None until the first notice arrives
    runs: int = 1
    # Delegation notices change no state_version: their edge ids make duplicates no-ops.
    edges: dict[str, str] = field(default_factory=dict)
    # The notices a run was started with (the dispatcher's start of a new workflow), applied first.
    opening: list[SessionNoticeItem] = field(default_factory=list)


@dataclass
class InvocationSnapshot:
    zone_id: str
    invocation_id: str
    service_id: str
    method: str
    status: str
    attempts: int
    max_attempts: int
    state_version: int
    deadline_at: str | None = None
    source_session_id: str | None = None


@dataclass
class InvocationNotice:
    invocation: InvocationSnapshot
    summary: str


@dataclass
class InvocationNoticeItem:
    signal: str
    notice: InvocationNotice


@dataclass
class InvocationState:
    zone_id: str
    invocation_id: str
    current: InvocationSnapshot | None = None
    runs: int = 1
    opening: list[InvocationNoticeItem] = field(default_factory=list)  # as SessionState.opening


@dataclass
class SettleCommand:
    """A timer fired: settle the entity's deadline if it is still due (one transaction)."""

    zone_id: str
    entity_id: str
