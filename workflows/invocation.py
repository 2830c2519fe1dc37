"""One workflow per invocation: `invocation/<zone>/<id>` (docs/DESIGN.md, "Postgres decides, Temporal follows").

The API's transactions create, start, cancel and complete invocations and write a notice for each
(rules/workflow_contract.INVOCATION_SIGNALS; argument an `InvocationNotice` with the invocation's
whole state at its `state_version`), delivered by signal-with-start, at least once: a notice older
than the known state is ignored. The workflow owns the running deadline: a durable timer on
`deadline_at` while the invocation runs, which settles the attempt (failed while attempts remain,
else timed_out) in one transaction within about a second of the deadline. It ends at a final state.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from rules import lifecycle
    from rules import workflow_contract as wc
    from workflows.common import DURABLE_RETRY, parse_time, wait_until
    from workflows.models import (
        SETTLE_INVOCATION_DEADLINE, InvocationNotice, InvocationNoticeItem, InvocationSnapshot, InvocationState,
        SettleCommand,
    )

SA_INVOCATION_STATUS = SearchAttributeKey.for_keyword(wc.SA_INVOCATION_STATUS)

DEADLINE = "invocation deadline"


def finished(snap: InvocationSnapshot | None) -> bool:
    """Final, or failed with no attempt left: nothing can happen to it any more."""
    return snap is not None and (snap.status in lifecycle.INVOCATION_FINAL
                                 or (snap.status == "failed" and snap.attempts >= snap.max_attempts))


@workflow.defn(name=wc.INVOCATION_WORKFLOW)
class InvocationWorkflow:
    @workflow.init
    def __init__(self, state: InvocationState) -> None:
        self.state = state
        self._not_due = 0  # settlements in a row that found the same deadline not yet due
        self._row_missing = False  # the settlement found no row: wait for a notice, not the timer
        # For the UI's current details only (not carried across continue-as-new).
        self._last = "continued as new" if state.runs > 1 else ""

    # ------------------------------------------------------------------ tracing (Temporal UI)

    def _details(self) -> str:
        """E.g. "running · attempt 1/3 · search on service svc-1 · from session S · deadline … ·
        last: attempt 1/3 started"."""
        s, c = self.state, self.state.current
        if c is None:
            parts = [f"awaiting the first notice of invocation {s.invocation_id} in zone {s.zone_id}"]
        else:
            parts = [c.status]
            if c.attempts:
                parts.append(f"attempt {c.attempts}/{c.max_attempts}")
            parts.append(f"{c.method} on service {c.service_id}")
            if c.source_session_id:
                parts.append(f"from session {c.source_session_id}")
            if self._deadline():
                parts.append(f"deadline {self._deadline()}")
            parts.append(f"v{c.state_version}")
        if self._last:
            parts.append(f"last: {self._last}")
        if s.runs > 1:
            parts.append(f"run {s.runs}")
        return " · ".join(parts)

    def _trace(self, last: str) -> None:
        self._last = last
        workflow.set_current_details(self._details())

    # ------------------------------------------------------------------ state

    def _sync_status_attribute(self) -> None:
        c = self.state.current
        if c is not None and workflow.info().typed_search_attributes.get(SA_INVOCATION_STATUS) != c.status:
            workflow.upsert_search_attributes([SA_INVOCATION_STATUS.value_set(c.status)])

    def _adopt(self, snap: InvocationSnapshot) -> str:
        """"stale" (older than known: ignored), "same" (nothing new) or "changed"."""
        known = self.state.current
        if known is not None and snap.state_version < known.state_version:
            return "stale"
        if snap == known:
            return "same"
        self.state.current = snap
        self._not_due = 0
        self._row_missing = False
        self._sync_status_attribute()
        return "changed"

    def _on_notice(self, kind: str, notice: InvocationNotice) -> None:
        s, snap = self.state, notice.invocation
        if (snap.zone_id, snap.invocation_id) != (s.zone_id, s.invocation_id):
            self._trace(f"ignored {kind} meant for invocation {snap.invocation_id} in zone {snap.zone_id}")
            return
        known = s.current.state_version if s.current is not None else None
        outcome = self._adopt(snap)
        if outcome == "stale":
            self._trace(f"stale {kind} v{snap.state_version} ignored (at v{known}): {notice.summary}")
        elif outcome == "same":
            self._trace(f"repeated {kind} v{snap.state_version}: no change")
        else:
            self._trace(notice.summary)

    # ------------------------------------------------------------------ notices (signals)

    @workflow.signal(name=wc.INVOCATION_CREATED)
    def created(self, notice: InvocationNotice) -> None:
        self._on_notice(wc.INVOCATION_CREATED, notice)

    @workflow.signal(name=wc.INVOCATION_STARTED)
    def started(self, notice: InvocationNotice) -> None:
        self._on_notice(wc.INVOCATION_STARTED, notice)

    @workflow.signal(name=wc.INVOCATION_CANCEL_REQUESTED)
    def cancel_requested(self, notice: InvocationNotice) -> None:
        self._on_notice(wc.INVOCATION_CANCEL_REQUESTED, notice)

    @workflow.signal(name=wc.INVOCATION_COMPLETED)
    def completed(self, notice: InvocationNotice) -> None:
        self._on_notice(wc.INVOCATION_COMPLETED, notice)

    @workflow.signal(name=wc.INVOCATION_SYNC)
    def sync(self, notice: InvocationNotice) -> None:
        self._on_notice(wc.INVOCATION_SYNC, notice)

    @workflow.signal(name=wc.NOTICES)
    def notices(self, batch: list[InvocationNoticeItem]) -> None:
        """Several notices delivered together, in their order."""
        for item in batch:
            if item.signal in wc.INVOCATION_SIGNALS:
                self._on_notice(item.signal, item.notice)
            else:
                self._trace(f"ignored a notice of unknown kind {item.signal!r}")

    @workflow.query
    def current_state(self) -> InvocationState:
        return self.state

    # ------------------------------------------------------------------ run loop

    @workflow.run
    async def run(self, state: InvocationState) -> str:
        workflow.set_current_details(self._details())
        if state.opening:  # started by the dispatcher's eager start (see SessionWorkflow.run)
            opening, self.state.opening = state.opening, []
            self.notices(opening)
        await workflow.wait_condition(lambda: self.state.current is not None)
        self._sync_status_attribute()
        while not finished(self.state.current):
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not finished(self.state.current):
                    self.state.runs += 1
                    workflow.continue_as_new(self.state)
                continue
            armed = self._deadline()
            # Woken only when the timer must change or the run must end (or continue as new). The
            # raw deadline is compared: the backed-off one moves with workflow.now(). (B023: the
            # lambda is only awaited within this iteration.)
            woken = lambda: (self._deadline() != armed or finished(self.state.current)  # noqa: E731, B023
                             or workflow.info().is_continue_as_new_suggested())
            if await wait_until(self._next_deadline(), woken, DEADLINE):
                await self._settle()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._known().status

    def _known(self) -> InvocationSnapshot:
        """The known state: set by the first notice, which the run waits for."""
        assert self.state.current is not None
        return self.state.current

    def _deadline(self) -> str | None:
        """The deadline (ISO) the known state arms a timer for: a running attempt's."""
        c = self.state.current
        if c is None or c.status != "running" or self._row_missing:
            return None
        return c.deadline_at

    def _next_deadline(self) -> datetime | None:
        due = parse_time(self._deadline())
        if due is not None and self._not_due:
            # Postgres found this very deadline not yet due (clocks apart): try again a little later.
            due = max(due, workflow.now() + timedelta(seconds=min(60, 2 ** (self._not_due - 1))))
        return due

    async def _settle(self) -> None:
        before = self.state.current
        assert before is not None
        snap: InvocationSnapshot | None = await workflow.execute_activity(
            SETTLE_INVOCATION_DEADLINE, SettleCommand(self.state.zone_id, self.state.invocation_id),
            # The SDK hints `type`; a union works.
            result_type=InvocationSnapshot | None,  # type: ignore[arg-type]
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DURABLE_RETRY,
            summary=f"deadline exceeded: fail attempt {before.attempts}/{before.max_attempts} or time out")
        if snap is None:
            # No row: keep what is known and wait for a notice (the reconciler's sync, if any).
            self._row_missing = True
            self._trace(f"{DEADLINE}: invocation row not found, waiting for a notice")
            return
        outcome = self._adopt(snap)
        now = self._known()
        if (now.status, now.deadline_at) == (before.status, before.deadline_at):
            # Nothing settled and the deadline stands (Postgres's clock behind, or its row behind
            # what this workflow knows): try again, backing off.
            self._not_due += 1
            self._trace(f"{DEADLINE}: not yet due in Postgres, trying again" if outcome != "stale" else
                        f"{DEADLINE}: Postgres answered v{snap.state_version}, behind the v{now.state_version} "
                        "known here; trying again")
        elif outcome == "stale":
            self._trace(f"{DEADLINE}: settled at v{snap.state_version}, older than the v{now.state_version} "
                        "already known")
        elif now.status != before.status:
            self._trace(f"deadline exceeded: attempt {now.attempts}/{now.max_attempts} {now.status}")
        else:
            self._trace(f"{DEADLINE}: moved to {now.deadline_at}")
