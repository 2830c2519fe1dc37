"""One workflow per session: `session/<zone>/<id>`.

The workflow decides; activities do the I/O. It owns the session's lifecycle commands (create,
suspend, resume, terminate, lease takeover: Workflow Updates whose validators give the reference's
409s), its durable timers (task TTL, service lease deadline) and its history. Postgres stays the
source of truth: every transition is one transaction in an activity, and other sessions changed by
a cascade are told by signal (`apply_change`) through a fan-out activity.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.common import (
        COMMAND_RETRY, COMMAND_TIMEOUT, DURABLE_RETRY, create_arrived, POSTGRES_UNAVAILABLE, parse_time, rejection,
    )
    from workflows.models import (
        NOTIFY_SESSIONS,
        RESUME_SESSION,
        SETTLE_SESSION_DEADLINE,
        START_SESSION,
        SUSPEND_SESSION,
        TAKE_SESSION_LEASE,
        TERMINATE_SESSION,
        CREATE_DELEGATION,
        REVOKE_DELEGATION,
        DelegateCommand,
        NotifyCommand,
        RevokeCommand,
        Outcome,
        SessionChange,
        SessionCommand,
        SessionState,
        StartSessionCommand,
    )

SA_ZONE = SearchAttributeKey.for_keyword("ZoneId")
SA_APPLICATION = SearchAttributeKey.for_keyword("ApplicationId")
SA_SESSION = SearchAttributeKey.for_keyword("SessionId")
SA_STATUS = SearchAttributeKey.for_keyword("SessionStatus")
SA_LIFECYCLE = SearchAttributeKey.for_keyword("Lifecycle")
SA_PARENT = SearchAttributeKey.for_keyword("ParentSessionId")
SA_ROOT = SearchAttributeKey.for_keyword("RootSessionId")

TERMINAL = ("terminated", "expired", "rejected")


@workflow.defn(name="Session")
class SessionWorkflow:
    @workflow.init
    def __init__(self, state: SessionState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._fanout_lock = asyncio.Lock()
        self._wake = False
        # For the UI's current details only (not history, not carried across continue-as-new).
        self._reason: str | None = None
        self._last = "continued as new" if state.runs > 1 else ""

    # ------------------------------------------------------------------ tracing (Temporal UI)

    def _details(self) -> str:
        """One line telling a reader which session this is and where it stands, e.g.
        "suspended (requested) · task session of app-1 · parent X · expires … ·
        last: suspend subtree (requested)"."""
        s = self.state
        status = f"{s.status} ({self._reason})" if self._reason and s.status not in ("active", "creating") else s.status
        parts = [status, f"{s.lifecycle} session of {s.application_id or '?'}"]
        if s.parent_id:
            parts.append(f"parent {s.parent_id}")
        if s.root_id and s.root_id not in (s.session_id, s.parent_id):
            parts.append(f"root {s.root_id}")
        if s.lifecycle == "task" and s.status in ("active", "suspended") and s.expires_at:
            parts.append(f"expires {s.expires_at}")
        if s.lifecycle == "service" and s.status == "active" and s.heartbeat_deadline_at:
            parts.append(f"lease until {s.heartbeat_deadline_at}")
        if self._last:
            parts.append(f"last: {self._last}")
        if s.runs > 1:
            parts.append(f"run {s.runs}")
        return " · ".join(parts)

    def _trace(self, last: str, reason: str | None = None) -> None:
        """Record the transition just applied in the workflow's current details."""
        self._last = last
        if reason is not None:
            self._reason = reason
        workflow.set_current_details(self._details())

    # ------------------------------------------------------------------ run loop

    @workflow.run
    async def run(self, state: SessionState) -> str:
        workflow.set_current_details(self._details())
        if not await create_arrived(lambda: self.state.status == "creating"):
            self.state.status = "rejected"
            if workflow.patched("session-create-timeout-status"):
                workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            self._trace("no create update within 5 minutes")
        while True:
            await self._drain_changes()
            if self.state.status in TERMINAL:
                break
            if workflow.info().is_continue_as_new_suggested():
                # Let running commands finish (they hold the lock across their activity) first.
                await workflow.wait_condition(lambda: not self._lock.locked() and workflow.all_handlers_finished())
                await self._drain_changes()
                if self.state.status not in TERMINAL:
                    self.state.runs += 1
                    workflow.continue_as_new(self.state)
                continue
            deadline, what = self._next_deadline()
            self._wake = False
            wake = lambda: (self._wake or bool(self.state.pending_changes)  # noqa: E731
                            or workflow.info().is_continue_as_new_suggested())
            if deadline is None:
                await workflow.wait_condition(wake)
                continue
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining > 0:
                try:
                    await workflow.wait_condition(wake, timeout=timedelta(seconds=remaining), timeout_summary=what)
                    continue
                except asyncio.TimeoutError:
                    pass
            await self._settle_deadline(what)
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._drain_changes()
        return self.state.status

    def _next_deadline(self) -> tuple[datetime | None, str]:
        s = self.state
        if s.lifecycle == "task" and s.status in ("active", "suspended") and s.expires_at:
            return parse_time(s.expires_at), "ttl expiry"
        if s.lifecycle == "service" and s.status == "active" and s.heartbeat_deadline_at:
            return parse_time(s.heartbeat_deadline_at), "lease deadline"
        return None, ""

    async def _settle_deadline(self, what: str) -> None:
        late = " (late heartbeat)" if "late heartbeat" in what else ""
        if what == "ttl expiry":
            summary = "expire (ttl): terminate subtree"
        elif what.startswith("lease deadline"):
            summary = f"lease lost{late}: suspend subtree unless renewed"
        else:
            summary = what
        async with self._lock:
            previous = self.state.status
            outcome: Outcome = await workflow.execute_activity(
                SETTLE_SESSION_DEADLINE, SessionCommand(self.state.zone_id, self.state.session_id,
                                                        op_id=str(workflow.uuid4())),
                result_type=Outcome, start_to_close_timeout=timedelta(seconds=30), retry_policy=DURABLE_RETRY,
                summary=summary)
            self._apply_outcome(outcome)
            status = self.state.status
            if status == "expired":
                self._trace("expire (ttl)", "ttl")
            elif status == "suspended" and previous != "suspended":
                self._trace(f"lease lost{late}: suspended subtree", "lease lost")
            elif status == previous:
                self._trace(f"{what}: lease renewed, timer re-armed" if self.state.lifecycle == "service"
                            else f"{what}: not due yet")
            else:
                self._trace(f"{what}: {status}")

    async def _drain_changes(self) -> None:
        """Tell the other sessions changed by a cascade (the run loop and commands both drain)."""
        async with self._fanout_lock:
            while self.state.pending_changes:
                batch = list(self.state.pending_changes)
                statuses = ", ".join(sorted({c.status for c in batch}))
                await workflow.execute_activity(
                    NOTIFY_SESSIONS, NotifyCommand(self.state.zone_id, batch),
                    start_to_close_timeout=timedelta(minutes=5), retry_policy=DURABLE_RETRY,
                    summary=f"cascade: signal {len(batch)} session(s) → {statuses}")
                del self.state.pending_changes[:len(batch)]

    # ------------------------------------------------------------------ state

    def _apply_own(self, session: dict[str, Any] | None) -> None:
        if not session:
            return
        s = self.state
        if int(session.get("state_version", 0)) < s.state_version:
            return
        previous = s.status
        for key in ("application_id", "lifecycle", "status", "parent_id", "root_id", "expires_at",
                    "heartbeat_deadline_at"):
            if key in session:
                setattr(s, key, session[key])
        s.state_version = int(session.get("state_version", s.state_version))
        self._wake = True
        if s.status != previous:
            workflow.upsert_search_attributes([SA_STATUS.value_set(s.status)])

    def _apply_outcome(self, outcome: Outcome) -> None:
        self._apply_own(outcome.session)
        self.state.pending_changes.extend(outcome.changes)

    async def _command(self, activity: str, cmd: SessionCommand | DelegateCommand | RevokeCommand, summary: str,
                       reason: str | None = None) -> dict[str, Any]:
        """Run one transition's transaction and answer its HTTP request. `summary` names the
        transition on its activity in the history and in the workflow's current details."""
        async with self._lock:
            cmd.op_id = str(workflow.uuid4())
            try:
                outcome: Outcome = await workflow.execute_local_activity(
                    activity, cmd, result_type=Outcome, schedule_to_close_timeout=COMMAND_TIMEOUT,
                    retry_policy=COMMAND_RETRY, summary=summary)
            except ActivityError as exc:
                raise rejection(*POSTGRES_UNAVAILABLE) from exc
            if outcome.error:
                # The row may have moved on without this workflow knowing (e.g. a cascade signal
                # still in flight): adopt what the database says.
                self._apply_own(outcome.session)
                body = outcome.error[1] if len(outcome.error) > 1 and isinstance(outcome.error[1], dict) else {}
                self._trace(f"{summary} refused ({body.get('error', outcome.error[0])})")
                raise rejection(*outcome.error)
            self._apply_outcome(outcome)
            self._trace(summary, reason)
            if outcome.changes and workflow.patched("fanout-before-reply"):
                # Answer only once every changed session's workflow has been told, so a client's
                # next command on a descendant meets a workflow that already knows its state.
                await self._drain_changes()
            return {"status": outcome.status, "body": outcome.body, "replayed": outcome.replayed}

    # ------------------------------------------------------------------ create

    @workflow.update
    async def create(self, cmd: StartSessionCommand) -> dict[str, Any]:
        try:
            outcome: Outcome = await workflow.execute_local_activity(
                START_SESSION, cmd, result_type=Outcome, schedule_to_close_timeout=COMMAND_TIMEOUT,
                retry_policy=COMMAND_RETRY,
                summary=f"create {cmd.lifecycle} session of {cmd.application_id}"
                        + (f" under {cmd.parent_id}" if cmd.parent_id else ""))
        except ActivityError as exc:
            self.state.status = "rejected"
            workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            self._trace("create failed", "postgres unavailable")
            raise rejection(*POSTGRES_UNAVAILABLE) from exc
        if outcome.error or outcome.replayed:
            # Nothing was created under this id: the workflow ends at once.
            self.state.status = "rejected"
            workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            if outcome.error:
                body = outcome.error[1] if len(outcome.error) > 1 and isinstance(outcome.error[1], dict) else {}
                self._trace("create refused", str(body.get("error", outcome.error[0])))
            else:
                self._trace("create: idempotent replay", "idempotent replay")
            if outcome.error:
                raise rejection(*outcome.error)
            return {"status": outcome.status, "body": outcome.body, "replayed": True}
        self._apply_own(outcome.session)
        workflow.upsert_search_attributes([SA_ROOT.value_set(self.state.root_id or self.state.session_id)])
        self._trace("create")
        return {"status": outcome.status, "body": outcome.body, "replayed": False}

    @create.validator
    def _validate_create(self, cmd: StartSessionCommand) -> None:
        if self.state.status != "creating":
            raise rejection(409, {"error": "session_already_started"})

    # ------------------------------------------------------------------ lifecycle commands

    @workflow.update
    async def suspend(self, cmd: SessionCommand) -> dict[str, Any]:
        reason = cmd.reason or "requested"
        return await self._command(SUSPEND_SESSION, cmd, f"suspend subtree ({reason})", reason)

    @suspend.validator
    def _validate_suspend(self, cmd: SessionCommand) -> None:
        if self.state.status != "active":
            raise rejection(409, {"error": "session_not_found_or_not_active"})

    @workflow.update
    async def resume(self, cmd: SessionCommand) -> dict[str, Any]:
        return await self._command(RESUME_SESSION, cmd, "resume subtree", "")

    @resume.validator
    def _validate_resume(self, cmd: SessionCommand) -> None:
        if self.state.status != "suspended":
            raise rejection(409, {"error": "session_not_found_or_not_suspended"})

    @workflow.update
    async def terminate(self, cmd: SessionCommand) -> dict[str, Any]:
        reason = cmd.reason or "requested"
        return await self._command(TERMINATE_SESSION, cmd, f"terminate subtree ({reason})", reason)

    @terminate.validator
    def _validate_terminate(self, cmd: SessionCommand) -> None:
        if self.state.status not in ("active", "suspended"):
            raise rejection(404, {"error": "session_not_found"})

    @workflow.update
    async def take_lease(self, cmd: SessionCommand) -> dict[str, Any]:
        return await self._command(TAKE_SESSION_LEASE, cmd, "lease takeover: new lease generation")

    @take_lease.validator
    def _validate_take_lease(self, cmd: SessionCommand) -> None:
        if self.state.status not in ("active", "suspended"):
            raise rejection(409, {"error": "session_not_live"})
        if self.state.lifecycle != "service":
            raise rejection(409, {"error": "session_not_service"})

    @workflow.update
    async def delegate(self, cmd: DelegateCommand) -> dict[str, Any]:
        """Create a delegation edge whose source is this session."""
        return await self._command(
            CREATE_DELEGATION, cmd,
            f"delegate edge {cmd.edge_id} to {cmd.target_session_id} ({cmd.receiver_application_id})")

    @delegate.validator
    def _validate_delegate(self, cmd: DelegateCommand) -> None:
        if self.state.status != "active":
            raise rejection(404, {"error": "delegation_endpoint_not_found"})

    @workflow.update
    async def revoke(self, cmd: RevokeCommand) -> dict[str, Any]:
        """Revoke an edge leaving this session, with its cascade."""
        return await self._command(REVOKE_DELEGATION, cmd, f"revoke edge {cmd.edge_id} with cascade")

    @workflow.update
    async def settle_now(self, cmd: SessionCommand) -> dict[str, Any]:
        """A heartbeat found the lease lapsed before the timer fired: settle it now."""
        await self._settle_deadline("lease deadline (late heartbeat)")
        return {"status": self.state.status}

    # ------------------------------------------------------------------ cascades from other sessions

    @workflow.signal
    def apply_change(self, change: SessionChange) -> None:
        previous = (self.state.status, self.state.state_version)
        self._apply_own({"status": change.status, "state_version": change.state_version,
                         "heartbeat_deadline_at": change.heartbeat_deadline_at})
        if (self.state.status, self.state.state_version) != previous:
            self._trace(f"cascade signal: {change.status}" + (f" ({change.reason})" if change.reason else ""),
                        change.reason or "")

    @workflow.query
    def current_state(self) -> SessionState:
        return self.state
