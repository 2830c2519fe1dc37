"""What Postgres and Temporal agree on: workflow ids, types, signal names, search attributes.

The command transactions (storage/) write workflow-outbox rows in these terms, the dispatcher
delivers them, the workflows (workflows/) receive them, and devstack registers the search
attributes from the same list. Constants only: workflow code imports this module.
"""

from __future__ import annotations

TASK_QUEUE = "coordinator"

# Workflow types.
SESSION_WORKFLOW = "AgentSession"
INVOCATION_WORKFLOW = "AgentInvocation"
MAINTENANCE_WORKFLOW = "Maintenance"


def session_workflow_id(zone_id: str, session_id: str) -> str:
    return f"session/{zone_id}/{session_id}"


def session_workflow_id_sql(zone_sql: str, session_sql: str) -> str:
    """`session_workflow_id` as an SQL expression over two SQL expressions."""
    return f"'session/' || {zone_sql} || '/' || {session_sql}"


def invocation_workflow_id(zone_id: str, invocation_id: str) -> str:
    return f"invocation/{zone_id}/{invocation_id}"


def invocation_workflow_id_sql(zone_sql: str, invocation_sql: str) -> str:
    """`invocation_workflow_id` as an SQL expression over two SQL expressions."""
    return f"'invocation/' || {zone_sql} || '/' || {invocation_sql}"


# Session notices (signal names). Each carries the session's whole state at its state_version.
SESSION_CREATED = "created"
SESSION_SUSPENDED = "suspended"
SESSION_RESUMED = "resumed"
SESSION_TERMINATED = "terminated"  # also `expired` status: the snapshot says which
SESSION_LEASE_TAKEN = "lease_taken"
DELEGATION_GIVEN = "delegation_given"
DELEGATION_RECEIVED = "delegation_received"
DELEGATION_ENDED = "delegation_ended"  # revoked or expired, as seen from either endpoint
SESSION_SYNC = "sync"  # the reconciler: no transition, just the current state
SESSION_SIGNALS = (SESSION_CREATED, SESSION_SUSPENDED, SESSION_RESUMED, SESSION_TERMINATED, SESSION_LEASE_TAKEN,
                   DELEGATION_GIVEN, DELEGATION_RECEIVED, DELEGATION_ENDED, SESSION_SYNC)

# Invocation notices (signal names): the transition that produced the snapshot.
INVOCATION_CREATED = "created"
INVOCATION_STARTED = "started"
INVOCATION_CANCEL_REQUESTED = "cancel_requested"
INVOCATION_COMPLETED = "completed"  # succeeded, failed, canceled, timed_out: the snapshot says which
INVOCATION_SYNC = "sync"
INVOCATION_SIGNALS = (INVOCATION_CREATED, INVOCATION_STARTED, INVOCATION_CANCEL_REQUESTED, INVOCATION_COMPLETED,
                      INVOCATION_SYNC)

# A workflow's first notice: the dispatcher starts the workflow with it in the input (`opening`;
# eager start: a worker on the dispatcher's own client gets the first workflow task in the
# start's answer), not by signal-with-start. Any other notice may find the workflow running.
OPENING_SIGNALS = frozenset({SESSION_CREATED, INVOCATION_CREATED})

# Several notices for one workflow, claimed together, travel as one signal (a list of
# {"signal": <one of the names above>, "notice": <its payload>}, applied in order): the more the
# dispatcher is behind, the fewer Temporal round trips and history events it costs.
NOTICES = "notices"

# The status sets and deadline rules the notices carry live in rules/lifecycle.py.

# The server's own `BuildIds` search attribute (KeywordList) holds what a workflow's tasks were
# completed by: "unversioned" and "unversioned:<build id>" for workers without versioning. The
# first completed task adds them, and the change costs the server a second visibility write per
# workflow; a workflow started with them already set costs one.
SA_BUILD_IDS = "BuildIds"


def build_ids(build_id: str) -> list[str]:
    """The `BuildIds` a workflow holds once a worker without versioning, of `build_id`, ran it."""
    return ["unversioned", f"unversioned:{build_id}"]


# Custom search attributes (all Keyword). SQL visibility allows at most 10 Keyword attributes:
# this list is full.
SA_ZONE = "ZoneId"
SA_APPLICATION = "ApplicationId"
SA_SESSION = "SessionId"
SA_SESSION_STATUS = "SessionStatus"
SA_LIFECYCLE = "Lifecycle"
SA_PARENT = "ParentSessionId"
SA_ROOT = "RootSessionId"
SA_INVOCATION = "InvocationId"
SA_INVOCATION_STATUS = "InvocationStatus"
SA_SERVICE = "ServiceId"
SEARCH_ATTRIBUTES: dict[str, str] = {name: "Keyword" for name in (
    SA_ZONE, SA_APPLICATION, SA_SESSION, SA_SESSION_STATUS, SA_LIFECYCLE, SA_PARENT, SA_ROOT, SA_INVOCATION,
    SA_INVOCATION_STATUS, SA_SERVICE)}

# Temporal server settings (dynamic config) the dispatcher relies on; devstack passes them to the dev
# server and docker-compose.yml mounts them for the cluster. The dispatcher holds back on the task
# queue's backlog figure (DescribeTaskQueue), which the server caches for 5 s by default: a figure
# that old makes the hold-back oscillate (5 s holding back with Temporal idle, 5 s flooding it).
SERVER_DYNAMIC_CONFIG: dict[str, object] = {"matching.TaskQueueInfoByBuildIdTTL": "250ms"}
