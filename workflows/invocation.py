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
        COMMAND_RETRY, COMMAND_TIMEOUT, DURABLE_RETRY, POSTGRES_UNAVAILABLE, parse_time, rejection,
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

    def _finished(self) -> bool:
        s = self.state
        return s.status in FINAL or (s.status == "failed" and s.attempts >= s.max_attempts)

    @workflow.run
    async def run(self, state: InvocationState) -> str:
        if self.state.status == "creating":
            try:
                await workflow.wait_condition(lambda: self.state.status != "creating",
                                              timeout=timedelta(minutes=5), timeout_summary="awaiting create")
            except asyncio.TimeoutError:
                self.state.status = "rejected"
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
                    retry_policy=DURABLE_RETRY, summary="deadline exceeded")
                self._apply(outcome.invocation)
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
                CREATE_INVOCATION, cmd, result_type=InvocationOutcome, start_to_close_timeout=COMMAND_TIMEOUT,
                retry_policy=COMMAND_RETRY)
        except ActivityError as exc:
            self._reject()
            raise rejection(*POSTGRES_UNAVAILABLE) from exc
        if outcome.error or outcome.replayed:
            self._reject()
            if outcome.error:
                raise rejection(*outcome.error)
            return {"status": outcome.status, "body": outcome.body, "replayed": True}
        self._apply(outcome.invocation)
        workflow.set_current_details(f"{cmd.method} on service {cmd.service_id}")
        return {"status": outcome.status, "body": outcome.body, "replayed": False}

    def _reject(self) -> None:
        self.state.status = "rejected"
        workflow.upsert_search_attributes([SA_INVOCATION_STATUS.value_set("rejected")])

    @create.validator
    def _validate_create(self, cmd: CreateInvocationCommand) -> None:
        if self.state.status != "creating":
            raise rejection(409, {"error": "invocation_already_created"})

    async def _transition(self, cmd: InvocationCommand) -> dict[str, Any]:
        async with self._lock:
            cmd.op_id = str(workflow.uuid4())
            try:
                outcome: InvocationOutcome = await workflow.execute_local_activity(
                    TRANSITION_INVOCATION, cmd, result_type=InvocationOutcome, start_to_close_timeout=COMMAND_TIMEOUT,
                    retry_policy=COMMAND_RETRY)
            except ActivityError as exc:
                raise rejection(*POSTGRES_UNAVAILABLE) from exc
            self._apply(outcome.invocation)
            if outcome.error:
                raise rejection(*outcome.error)
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
