"""What the session and invocation workflows share: follow one entity's notices, keep its one
deadline timer, settle the deadline by activity when it fires, continue as new when suggested.

A follower knows its entity as `state.current` (a snapshot at a `state_version`; None until the
first notice). Subclasses say which deadline the known state arms, how to settle it, how to
describe the entity and which search attribute carries its status.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from workflows.common import wait_until


class Follower:
    state: Any  # SessionState or InvocationState
    status_attribute: SearchAttributeKey[str]
    signals: tuple[str, ...]  # the notice kinds a `notices` batch may carry

    def _init_follower(self, state: Any) -> None:
        self.state = state
        self._not_due = 0  # settlements in a row that found the same deadline not yet due
        # For the UI's current details only (not carried across continue-as-new).
        self._last = "continued as new" if state.runs > 1 else ""

    # ------------------------------------------------------------------ for subclasses

    def _details(self) -> str:
        raise NotImplementedError

    def _on_notice(self, kind: str, notice: Any) -> None:
        raise NotImplementedError

    def _ended(self) -> bool:
        raise NotImplementedError

    def _deadline(self) -> Any:
        """What the known state arms (compared to see whether the timer must change)."""
        raise NotImplementedError

    def _next_deadline(self) -> tuple[str, datetime | None]:
        """The timer's name and when it fires."""
        raise NotImplementedError

    async def _settle(self, what: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _trace(self, last: str) -> None:
        self._last = last
        workflow.set_current_details(self._details())

    def _with_tail(self, parts: list[str]) -> str:
        """The details line: `parts`, then the last thing that happened and the run number."""
        if self._last:
            parts.append(f"last: {self._last}")
        if self.state.runs > 1:
            parts.append(f"run {self.state.runs}")
        return " · ".join(parts)

    def _sync_status_attribute(self) -> None:
        """Keep the status search attribute equal to the known status."""
        c = self.state.current
        if c is not None and workflow.info().typed_search_attributes.get(self.status_attribute) != c.status:
            workflow.upsert_search_attributes([self.status_attribute.value_set(c.status)])

    def _apply_batch(self, batch: list[Any]) -> None:
        """Several notices delivered together (the `notices` signal), in their order."""
        for item in batch:
            if item.signal in self.signals:
                self._on_notice(item.signal, item.notice)
            else:
                self._trace(f"ignored a notice of unknown kind {item.signal!r}")

    def _known(self) -> Any:
        """The known state: set by the first notice, which the run waits for."""
        assert self.state.current is not None
        return self.state.current

    def _backed_off(self, due: datetime | None) -> datetime | None:
        if due is not None and self._not_due:
            # Postgres found this very deadline not yet due (clocks apart): try again a little later.
            due = max(due, workflow.now() + timedelta(seconds=min(60, 2 ** (self._not_due - 1))))
        return due

    def _trace_not_settled(self, what: str, outcome: str, answered_version: int) -> None:
        """Nothing settled and the deadline stands (Postgres's clock behind, or its row behind what
        this workflow knows): try again, backing off."""
        self._not_due += 1
        self._trace(f"{what}: not yet due in Postgres, trying again" if outcome != "stale" else
                    f"{what}: Postgres answered v{answered_version}, behind the v{self._known().state_version} "
                    "known here; trying again")

    def _trace_stale_settlement(self, what: str, answered_version: int) -> None:
        self._trace(f"{what}: settled at v{answered_version}, older than the v{self._known().state_version} "
                    "already known")

    async def _follow(self) -> str:
        """The run: apply the opening notices, wait for the first, then keep the deadline timer
        until the entity ends; continue as new when Temporal suggests it."""
        workflow.set_current_details(self._details())
        # Started by signal-with-start, the first notice comes with the first task; started by the
        # dispatcher's (eager) start, the notices come in the input (runs before that had none).
        if self.state.opening:
            opening, self.state.opening = self.state.opening, []
            self._apply_batch(opening)
        await workflow.wait_condition(lambda: self.state.current is not None)
        self._sync_status_attribute()  # a run continued as new, or started without attributes
        while not self._ended():
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._ended():
                    self.state.runs += 1
                    workflow.continue_as_new(self.state)
                continue
            what, due = self._next_deadline()
            armed = self._deadline()
            # Woken only when the timer must change (or the run must end or continue as new): a
            # notice that leaves the deadline as it was costs no timer cancel and restart. The raw
            # deadline is compared: the backed-off one moves with workflow.now(). (B023: the lambda
            # is only awaited within this iteration.)
            if await wait_until(due, lambda: (self._deadline() != armed or self._ended()  # noqa: B023
                                              or workflow.info().is_continue_as_new_suggested()), what):
                await self._settle(what)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return str(self._known().status)
