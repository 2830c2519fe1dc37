"""Lifecycle rules of sessions and invocations, each written once: which statuses are live, ended
or final, when a task expires, and which deadline a state arms (the one timer its workflow keeps).

Every rule has its Python form (the workflows, the notices) beside its SQL form (the statements of
storage/): change one, change the other on the next line. tests/test_lifecycle_sql.py holds them
to the same answers on a real Postgres. No I/O here: workflow code imports this module.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal, TypeVar, get_args

T = TypeVar("T")


def sql_list(values: tuple[str, ...]) -> str:
    """An SQL list literal: ('a', 'b'). The values are this module's constants, never input."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


# ------------------------------------------------------------------------------------- sessions

SessionStatus = Literal["active", "suspended", "terminated", "expired"]
SESSION_STATUSES: tuple[str, ...] = get_args(SessionStatus)
# Live: not ended; a live session's workflow runs, its edges may stand, its subtree cascades.
SESSION_LIVE = ("active", "suspended")
SESSION_LIVE_SQL = sql_list(SESSION_LIVE)
SESSION_TERMINAL = ("terminated", "expired")
SESSION_TERMINAL_SQL = sql_list(SESSION_TERMINAL)

LIFECYCLES = ("task", "service")
# A task without a ttl_seconds lives this long (reference: COALESCE(ttl_seconds, 3600)); an explicit
# ttl_seconds, even 0, is taken as it is.
DEFAULT_TASK_TTL_SECONDS = 3600


def task_ttl_seconds(ttl_seconds: int | None) -> int:
    return DEFAULT_TASK_TTL_SECONDS if ttl_seconds is None else ttl_seconds


def task_ttl_seconds_sql(ttl: str) -> str:
    return f"COALESCE({ttl}, {DEFAULT_TASK_TTL_SECONDS})"


def task_expires_at(lifecycle: str, started_at: datetime, ttl_seconds: int | None) -> datetime | None:
    """When a task expires (a service has no TTL: its lease decides)."""
    if lifecycle != "task":
        return None
    return started_at + timedelta(seconds=task_ttl_seconds(ttl_seconds))


def task_expires_at_sql(a: str) -> str:
    """`task_expires_at` over the columns of alias `a` (NULL for a service)."""
    return (f"CASE WHEN {a}.lifecycle = 'task' THEN {a}.started_at + make_interval("
            f"secs => {task_ttl_seconds_sql(f'{a}.ttl_seconds')}) END")


# The deadlines a session's state can arm, named as the workflow's timers are in its history.
TTL_EXPIRY = "ttl expiry"
LEASE_DEADLINE = "lease deadline"


def session_deadline(lifecycle: str, status: str, expires_at: T | None,
                     heartbeat_deadline_at: T | None) -> tuple[str, T | None]:
    """Which deadline a session in this state arms, and when: a task's expiry while it is live
    (suspended tasks expire too), a service's lease while it is active. ("", None): none."""
    if lifecycle == "task" and status in SESSION_LIVE and expires_at is not None:
        return TTL_EXPIRY, expires_at
    if lifecycle == "service" and status == "active" and heartbeat_deadline_at is not None:
        return LEASE_DEADLINE, heartbeat_deadline_at
    return "", None


def session_deadline_sql(a: str) -> str:
    """`session_deadline`'s time over the columns of alias `a` (NULL: none)."""
    return f"""CASE
        WHEN {a}.lifecycle = 'task' AND {a}.status IN {SESSION_LIVE_SQL} THEN {task_expires_at_sql(a)}
        WHEN {a}.lifecycle = 'service' AND {a}.status = 'active' THEN {a}.heartbeat_deadline_at END"""


def ttl_due_sql(a: str) -> str:
    """A live task of alias `a` past its expiry (the TTL settlement expires its subtree)."""
    return f"({a}.lifecycle = 'task' AND {a}.status IN {SESSION_LIVE_SQL} AND {task_expires_at_sql(a)} <= now())"


def lease_due_sql(a: str) -> str:
    """An active service of alias `a` past its lease (the lease settlement suspends its subtree)."""
    return f"({a}.lifecycle = 'service' AND {a}.status = 'active' AND {a}.heartbeat_deadline_at <= now())"


def capacity_live_sql(a: str) -> str:
    """Reference "capacity-live": counts against the zone's and the application's caps. A live
    session whose deadline has not passed, or a suspended service (its lease stopped counting).
    `terminated_at IS NULL` says what the status does (a check constraint keeps them equal); it lets
    a zone's count read the partial index `sessions_zone_live` (migration 0005)."""
    return f"""{a}.terminated_at IS NULL AND {a}.status IN {SESSION_LIVE_SQL} AND (
      ({a}.lifecycle = 'service' AND ({a}.status = 'suspended' OR {a}.heartbeat_deadline_at > now()))
      OR ({a}.lifecycle = 'task' AND {task_expires_at_sql(a)} > now()))"""


def delegation_endpoint_live_sql(a: str) -> str:
    """Reference "delegation-endpoint-live": may give or receive an edge. Active, and within an
    explicit TTL, or a service within its lease."""
    return f"""{a}.status = 'active' AND (
    ({a}.ttl_seconds IS NOT NULL AND {a}.started_at + make_interval(secs => {a}.ttl_seconds) > now())
    OR ({a}.lifecycle = 'service' AND {a}.heartbeat_deadline_at IS NOT NULL AND {a}.heartbeat_deadline_at > now()))"""


def invocation_live_sql(a: str) -> str:
    """Reference "invocation-live": may take part in an invocation. Active within an explicit TTL
    (a service with no ttl_seconds never qualifies)."""
    return (f"{a}.status = 'active' AND {a}.ttl_seconds IS NOT NULL"
            f" AND {a}.started_at + make_interval(secs => {a}.ttl_seconds) > now()")


# ---------------------------------------------------------------------------------- invocations

# Final: nothing can happen to the invocation any more. A failed one is final once no attempt is left.
INVOCATION_FINAL = ("succeeded", "canceled", "timed_out", "dead")
INVOCATION_FINAL_SQL = sql_list(INVOCATION_FINAL)
# What a cancel can no longer reach: final, or failed (its attempt is over).
INVOCATION_SETTLED_SQL = sql_list((*INVOCATION_FINAL, "failed"))


def invocation_finished(status: str, attempts: int, max_attempts: int) -> bool:
    return status in INVOCATION_FINAL or (status == "failed" and attempts >= max_attempts)


def invocation_finished_sql(a: str) -> str:
    return f"({a}.status IN {INVOCATION_FINAL_SQL} OR ({a}.status = 'failed' AND {a}.attempts >= {a}.max_attempts))"


def invocation_deadline(status: str, deadline_at: T | None) -> T | None:
    """The running attempt's deadline: the one timer an invocation's workflow keeps."""
    return deadline_at if status == "running" else None


def invocation_deadline_sql(a: str) -> str:
    return f"CASE WHEN {a}.status = 'running' THEN {a}.deadline_at END"
