"""One workflow per session: `session/<zone>/<id>` (docs/DESIGN.md, "Postgres decides, Temporal follows").

Postgres decides every transition; this workflow follows. Each command transaction writes a
workflow-outbox row and the dispatcher delivers it by signal-with-start: the signal's name is the
kind of notice (rules/workflow_contract.SESSION_SIGNALS), its argument a `SessionNotice` carrying
the session's whole state at its `state_version`. Delivery is at least once: a notice older than
the known state is ignored, delegation notices (which change no state_version) are deduplicated by
edge id.

The workflow owns time: the task TTL (`expires_at`, while active or suspended) and the service
lease deadline (`heartbeat_deadline_at`, while active) are durable timers. When one fires, an
activity settles the deadline in one transaction if it is still due (heartbeats move the lease
without a notice, so the timer re-arms from the row it reads) and writes the notices of every
session it changed. The history tells the session's story; the current details line sums it up.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from rules import lifecycle
    from rules import workflow_contract as wc
    from workflows.common import DURABLE_RETRY, parse_time
    from workflows.follower import Follower
    from workflows.models import (
        SETTLE_SESSION_DEADLINE, SessionNotice, SessionNoticeItem, SessionSnapshot, SessionState, SettleCommand,
    )

SA_STATUS = SearchAttributeKey.for_keyword(wc.SA_SESSION_STATUS)

TTL_EXPIRY = lifecycle.TTL_EXPIRY
LEASE_DEADLINE = lifecycle.LEASE_DEADLINE
SETTLE_SUMMARY = {TTL_EXPIRY: "ttl expiry: expire the subtree if still due",
                  LEASE_DEADLINE: "lease deadline: suspend the subtree unless renewed"}

# What a delegation notice says about its edge, as kept in SessionState.edges.
EDGE_ROLES = {wc.DELEGATION_GIVEN: "given", wc.DELEGATION_RECEIVED: "received", wc.DELEGATION_ENDED: "ended"}
EDGE_MEMORY = 200  # edge ids remembered for deduplication (the oldest forgotten first)


def remember_edge(edges: dict[str, str], edge_id: str, role: str, limit: int = EDGE_MEMORY) -> bool:
    """Record what a notice says of an edge; False when it repeats what is known (a duplicate).

    An ended edge stays ended: a late or repeated "given"/"received" after it changes nothing.
    At most `limit` edges are kept; beyond, the smallest ids go first. Edge ids are UUIDv7 (time
    ordered), so those are the oldest edges, and the rule gives the same answer before and after
    continue-as-new (the JSON converter sorts the keys of the carried state).
    """
    known = edges.get(edge_id)
    if known == role or known == "ended":
        return False
    edges[edge_id] = role
    while len(edges) > limit:
        del edges[min(edges)]
    return True


def later(a: str | None, b: str | None) -> str | None:
    """The later of two ISO times (either may be missing)."""
    ta, tb = parse_time(a), parse_time(b)
    if ta is None or tb is None:
        return b if tb is not None else a
    return b if tb > ta else a


def merge_same_version(known: SessionSnapshot, new: SessionSnapshot) -> SessionSnapshot:
    """A snapshot at the version already known. Heartbeats move the lease without a new version, and
    only forward: keep the later deadline, so a repeated notice never winds the lease timer back.
    A snapshot without a reason (a sync, a settlement) keeps the reason the notice gave."""
    return dataclasses.replace(
        new, heartbeat_deadline_at=later(known.heartbeat_deadline_at, new.heartbeat_deadline_at),
        reason=new.reason if new.reason is not None or new.status != known.status else known.reason)


@workflow.defn(name=wc.SESSION_WORKFLOW)
class SessionWorkflow(Follower):
    state: SessionState
    status_attribute = SA_STATUS
    signals = wc.SESSION_SIGNALS

    @workflow.init
    def __init__(self, state: SessionState) -> None:
        self._init_follower(state)

    # ------------------------------------------------------------------ tracing (Temporal UI)

    def _details(self) -> str:
        """One line telling a reader which session this is and where it stands, e.g.
        "suspended (requested) · task session of app-1 · parent X · expires … ·
        last: suspended with the subtree of X (requested)"."""
        s, c = self.state, self.state.current
        if c is None:
            parts = [f"awaiting the first notice of session {s.session_id} in zone {s.zone_id}"]
        else:
            parts = [f"{c.status} ({c.reason})" if c.reason and c.status != "active" else c.status,
                     f"{c.lifecycle} session of {c.application_id}"]
            if c.parent_id:
                parts.append(f"parent {c.parent_id}")
            if c.root_id and c.root_id not in (c.session_id, c.parent_id):
                parts.append(f"root {c.root_id}")
            what, deadline = self._deadline()
            if what == TTL_EXPIRY:
                parts.append(f"expires {deadline}")
            elif what == LEASE_DEADLINE:
                parts.append(f"lease {c.lease_generation} until {deadline}")
            parts.append(f"v{c.state_version}")
        return self._with_tail(parts)

    # ------------------------------------------------------------------ state

    def _adopt(self, snap: SessionSnapshot) -> str:
        """Adopt a snapshot of the followed entity, by its state_version: "stale" (older than known:
        ignored), "same" (nothing new) or "changed"."""
        known = self.state.current
        if known is not None:
            if snap.state_version < known.state_version:
                return "stale"
            if snap.state_version == known.state_version:
                snap = merge_same_version(known, snap)
            if snap == known:
                return "same"
        self.state.current = snap
        self._not_due = 0
        self._sync_status_attribute()
        return "changed"

    def _on_notice(self, kind: str, notice: SessionNotice) -> None:
        s, snap = self.state, notice.session
        if (snap.zone_id, snap.session_id) != (s.zone_id, s.session_id):
            self._trace(f"ignored {kind} meant for session {snap.session_id} in zone {snap.zone_id}")
            return
        if notice.edge_id:
            role = EDGE_ROLES.get(kind) or ("received" if kind == wc.SESSION_CREATED else None)
            if role is not None and not remember_edge(s.edges, notice.edge_id, role) and kind in EDGE_ROLES:
                self._trace(f"repeated {kind} of edge {notice.edge_id} ignored")
                return
        known = s.current.state_version if s.current is not None else None
        outcome = self._adopt(snap)
        if outcome == "stale" and kind in EDGE_ROLES:
            # The edge news counts; the session state it came with is behind what is known.
            self._trace(f"{notice.summary} (its v{snap.state_version} is older than v{known}: state kept)")
        elif outcome == "stale":
            self._trace(f"stale {kind} v{snap.state_version} ignored (at v{known}): {notice.summary}")
        elif outcome == "same" and kind not in EDGE_ROLES:
            self._trace(f"repeated {kind} v{snap.state_version}: no change")
        else:
            self._trace(notice.summary)

    # ------------------------------------------------------------------ notices (signals)

    @workflow.signal(name=wc.SESSION_CREATED)
    def created(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_CREATED, notice)

    @workflow.signal(name=wc.SESSION_SUSPENDED)
    def suspended(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_SUSPENDED, notice)

    @workflow.signal(name=wc.SESSION_RESUMED)
    def resumed(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_RESUMED, notice)

    @workflow.signal(name=wc.SESSION_TERMINATED)
    def terminated(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_TERMINATED, notice)

    @workflow.signal(name=wc.SESSION_LEASE_TAKEN)
    def lease_taken(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_LEASE_TAKEN, notice)

    @workflow.signal(name=wc.DELEGATION_GIVEN)
    def delegation_given(self, notice: SessionNotice) -> None:
        self._on_notice(wc.DELEGATION_GIVEN, notice)

    @workflow.signal(name=wc.DELEGATION_RECEIVED)
    def delegation_received(self, notice: SessionNotice) -> None:
        self._on_notice(wc.DELEGATION_RECEIVED, notice)

    @workflow.signal(name=wc.DELEGATION_ENDED)
    def delegation_ended(self, notice: SessionNotice) -> None:
        self._on_notice(wc.DELEGATION_ENDED, notice)

    @workflow.signal(name=wc.SESSION_SYNC)
    def sync(self, notice: SessionNotice) -> None:
        self._on_notice(wc.SESSION_SYNC, notice)

    @workflow.signal(name=wc.NOTICES)
    def notices(self, batch: list[SessionNoticeItem]) -> None:
        """Several notices delivered together, in their order."""
        self._apply_batch(batch)

    @workflow.query
    def current_state(self) -> SessionState:
        return self.state

    # ------------------------------------------------------------------ run loop

    @workflow.run
    async def run(self, state: SessionState) -> str:
        return await self._follow()

    def _ended(self) -> bool:
        return self.state.current is not None and self.state.current.status in lifecycle.SESSION_TERMINAL

    def _deadline(self) -> tuple[str, str | None]:
        """Which timer the known state arms, and its deadline (ISO), if any."""
        c = self.state.current
        if c is None:
            return "", None
        # An empty ISO string arms nothing, as a missing one.
        return lifecycle.session_deadline(c.lifecycle, c.status, c.expires_at or None, c.heartbeat_deadline_at or None)

    def _next_deadline(self) -> tuple[str, datetime | None]:
        what, deadline = self._deadline()
        return what, self._backed_off(parse_time(deadline))

    async def _settle(self, what: str) -> None:
        before = self.state.current
        assert before is not None
        _, deadline = self._deadline()
        snap: SessionSnapshot | None = await workflow.execute_activity(
            SETTLE_SESSION_DEADLINE, SettleCommand(self.state.zone_id, self.state.session_id),
            # The SDK hints `type`; a union works.
            result_type=SessionSnapshot | None,  # type: ignore[arg-type]
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DURABLE_RETRY, summary=SETTLE_SUMMARY[what])
        if snap is None:
            current = self._known()
            self.state.current = dataclasses.replace(current, status="terminated",
                                                     reason=current.reason or "session_row_missing")
            self._sync_status_attribute()
            self._trace(f"{what}: the session's row is gone, ending")
            return
        outcome = self._adopt(snap)
        now = self._known()
        if now.status == before.status and self._deadline() == (what, deadline):
            self._trace_not_settled(what, outcome, snap.state_version)
        elif outcome == "stale":
            self._trace_stale_settlement(what, snap.state_version)
        elif now.status == "expired":
            self._trace(f"{what}: expired with the subtree")
        elif what == LEASE_DEADLINE and before.status == "active" and now.status == "suspended":
            self._trace(f"{what}: lease lost, suspended with the subtree")
        elif now.status != before.status:
            self._trace(f"{what}: {now.status}")
        else:
            self._trace(f"{what}: renewed, timer re-armed for {self._deadline()[1]}"
                        if what == LEASE_DEADLINE else f"{what}: moved to {self._deadline()[1]}")
