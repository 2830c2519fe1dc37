"""One workflow per invocation: `invocation/<zone>/<id>`.

Commands (create, start, cancel, complete) are Workflow Updates whose validators give the
reference's 409s; the running deadline is a durable timer that fails the attempt (or times the
invocation out) within about a second of `deadline_at`. The workflow ends at a final state.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.common import (
        COMMAND_RETRY, COMMAND_TIMEOUT, DURABLE_RETRY, create_arrived, POSTGRES_UNAVAILABLE, parse_time, rejection,
    )
    from workflows.models import (
        CREATE_INVOCATION, SETTLE_INVOCATION_DEADLINE, TRANSITION_INVOCATION, CreateInvocationCommand,
        InvocationCommand, InvocationOutcome, InvocationState,
    )

SA_INVOCATION_STATUS = SearchAttributeKey.for_keyword("InvocationStatus")

FINAL = ("succeeded", "canceled", "timed_out", "dead", "rejected")


@workflow.defn(name="Invocation")
class InvocationWorkflow:
    @workflow.init
    def __init__(self, state: InvocationState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._wake = False
        # For the UI's current details only (set by the create update, rebuilt on replay).
        self._method = ""
        self._application = ""
        self._last = ""

    def _details(self) -> str:
        """E.g. "running · attempt 1/3 · search on service svc-1 · app app-1 · deadline … ·
        last: start attempt 1/3 → running"."""
        s = self.state
        parts = [s.status]
        if s.attempts:
            parts.append(f"attempt {s.attempts}/{s.max_attempts}")
        what = f"{self._method} on " if self._method else ""
        parts.append(f"{what}service {s.service_id or '?'}")
        if self._application:
            parts.append(f"app {self._application}")
        if s.status == "running" and s.deadline_at:
            parts.append(f"deadline {s.deadline_at}")
        if self._last:
            parts.append(f"last: {self._last}")
        return " · ".join(parts)

    def _trace(self, last: str) -> None:
        self._last = last
        workflow.set_current_details(self._details())

    def _finished(self) -> bool:
        s = self.state
        return s.status in FINAL or (s.status == "failed" and s.attempts >= s.max_attempts)

    @workflow.run
    async def run(self, state: InvocationState) -> str:
        if not await create_arrived(lambda: self.state.status == "creating"):
            self.state.status = "rejected"
            if workflow.patched("invocation-create-timeout-status"):
                workflow.upsert_search_attributes([SA_INVOCATION_STATUS.value_set("rejected")])
            self._trace("no create update within 5 minutes")
        while not self._finished():
            self._wake = False
            deadline = parse_time(self.state.deadline_at) if self.state.status == "running" else None
            if deadline is None:
                await workflow.wait_condition(lambda: self._wake)
                continue
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining > 0:
                try:
                    await workflow.wait_condition(lambda: self._wake, timeout=timedelta(seconds=remaining),
                                                  timeout_summary="invocation deadline")
                    continue
                except asyncio.TimeoutError:
                    pass
            async with self._lock:
                outcome: InvocationOutcome = await workflow.execute_activity(
                    SETTLE_INVOCATION_DEADLINE,
                    InvocationCommand(self.state.zone_id, self.state.invocation_id, "settle", str(workflow.uuid4())),
                    result_type=InvocationOutcome, start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=DURABLE_RETRY,
                    summary=f"deadline exceeded: fail attempt {self.state.attempts}/{self.state.max_attempts}"
                            " or time out")
                self._apply(outcome.invocation)
                self._trace(f"deadline exceeded → {self.state.status}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.state.status

    def _apply(self, inv: dict[str, Any] | None) -> None:
        if not inv or int(inv.get("state_version", 0)) < self.state.state_version:
            return
        previous = self.state.status
        for key in ("status", "attempts", "max_attempts", "deadline_at", "state_version", "service_id"):
            if key in inv:
                setattr(self.state, key, inv[key])
        self._wake = True
        if self.state.status != previous:
            workflow.upsert_search_attributes([SA_INVOCATION_STATUS.value_set(self.state.status)])

    @workflow.update
    async def create(self, cmd: CreateInvocationCommand) -> dict[str, Any]:
        try:
            outcome: InvocationOutcome = await workflow.execute_local_activity(
                CREATE_INVOCATION, cmd, result_type=InvocationOutcome, schedule_to_close_timeout=COMMAND_TIMEOUT,
                retry_policy=COMMAND_RETRY, summary=f"create invocation {cmd.method} on service {cmd.service_id}")
        except ActivityError as exc:
            self._method, self._application = cmd.method, cmd.scope_id
            self._reject()
            self._trace("create failed (postgres unavailable)")
            raise rejection(*POSTGRES_UNAVAILABLE) from exc
        self._method, self._application = cmd.method, cmd.scope_id
        if outcome.error or outcome.replayed:
            self._reject()
            self._trace(f"create refused ({outcome.error[0]})" if outcome.error else "create: idempotent replay")
            if outcome.error:
                raise rejection(*outcome.error)
            return {"status": outcome.status, "body": outcome.body, "replayed": True}
        self._apply(outcome.invocation)
        self._trace("create")
        return {"status": outcome.status, "body": outcome.body, "replayed": False}

    def _reject(self) -> None:
        self.state.status = "rejected"
        workflow.upsert_search_attributes([SA_INVOCATION_STATUS.value_set("rejected")])

    @create.validator
    def _validate_create(self, cmd: CreateInvocationCommand) -> None:
        if self.state.status != "creating":
            raise rejection(409, {"error": "invocation_already_created"})

    async def _transition(self, cmd: InvocationCommand) -> dict[str, Any]:
        if cmd.action == "start":
            summary = f"start attempt {self.state.attempts + 1}/{self.state.max_attempts}"
        elif cmd.action == "cancel":
            summary = "cancel" + (f" ({cmd.reason})" if cmd.reason else "")
        elif cmd.action == "complete":
            summary = f"complete ({cmd.status or 'failed'})"
        else:
            summary = cmd.action
        async with self._lock:
            cmd.op_id = str(workflow.uuid4())
            try:
                outcome: InvocationOutcome = await workflow.execute_local_activity(
                    TRANSITION_INVOCATION, cmd, result_type=InvocationOutcome, schedule_to_close_timeout=COMMAND_TIMEOUT,
                    retry_policy=COMMAND_RETRY, summary=summary)
            except ActivityError as exc:
                raise rejection(*POSTGRES_UNAVAILABLE) from exc
            self._apply(outcome.invocation)
            if outcome.error:
                self._trace(f"{summary} refused ({outcome.error[0]})")
                raise rejection(*outcome.error)
            self._trace(f"{summary} → {self.state.status}")
            return {"status": outcome.status, "body": outcome.body}

    @workflow.update
    async def start(self, cmd: InvocationCommand) -> dict[str, Any]:
        return await self._transition(cmd)

    @start.validator
    def _validate_start(self, cmd: InvocationCommand) -> None:
        s = self.state
        if s.status not in ("pending", "failed") or s.attempts >= s.max_attempts:
            raise rejection(409, {"error": "invocation_not_startable"})

    @workflow.update
    async def cancel(self, cmd: InvocationCommand) -> dict[str, Any]:
        return await self._transition(cmd)

    @cancel.validator
    def _validate_cancel(self, cmd: InvocationCommand) -> None:
        if self.state.status in ("succeeded", "canceled", "timed_out", "dead", "failed", "creating", "rejected"):
            raise rejection(409, {"error": "invocation_not_cancelable"})

    @workflow.update
    async def complete(self, cmd: InvocationCommand) -> dict[str, Any]:
        return await self._transition(cmd)

    @complete.validator
    def _validate_complete(self, cmd: InvocationCommand) -> None:
        if self.state.status not in ("running", "cancel_requested"):
            raise rejection(409, {"error": "invocation_not_completable"})

    @workflow.query
    def current_state(self) -> InvocationState:
        return self.state
