"""The session and invocation workflows on their own: notices in, timers, settlements out.

Notices are delivered exactly as the dispatcher delivers workflow-outbox rows (signal-with-start,
payloads built by storage/notices.py from table-shaped rows); the settle activities are
mocked by name and answer what the real ones would (the row after the transaction, as a snapshot).
Time-skipping test server for everything but continue-as-new, which needs a server that suggests
it (a dev server with a low history threshold).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from rules import workflow_contract as wc
from storage.notices import (
    WorkflowNotice, invocation_notice, invocation_snapshot, session_notice, session_snapshot,
)
from workflows.invocation import InvocationWorkflow
from workflows.models import (
    SETTLE_INVOCATION_DEADLINE, SETTLE_SESSION_DEADLINE, InvocationSnapshot, InvocationState, SessionSnapshot,
    SessionState, SettleCommand,
)
from workflows.session import EDGE_MEMORY, SessionWorkflow, remember_edge

ZONE = "zone-wf"


# ------------------------------------------------------------------------------------------ servers


async def register_search_attributes(client: Client) -> None:
    await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace=client.namespace,
        search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in wc.SEARCH_ATTRIBUTES}))


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    server = shutil.which("temporal-test-server") or str(Path(sys.executable).parent / "temporal-test-server")
    environment = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=server)
    await register_search_attributes(environment.client)
    yield environment
    await environment.shutdown()


SettleFn = Callable[[SettleCommand], Awaitable[Any]]


def worker_for(client: Client, *, sessions: SettleFn | None = None, invocations: SettleFn | None = None) -> Worker:
    """A worker on a fresh task queue with the real workflows and the given settle mocks."""

    async def never(cmd: SettleCommand) -> None:
        raise AssertionError(f"no settlement expected: {cmd}")

    @activity.defn(name=SETTLE_SESSION_DEADLINE)
    async def settle_session(cmd: SettleCommand) -> SessionSnapshot | None:
        return await (sessions or never)(cmd)

    @activity.defn(name=SETTLE_INVOCATION_DEADLINE)
    async def settle_invocation(cmd: SettleCommand) -> InvocationSnapshot | None:
        return await (invocations or never)(cmd)

    return Worker(client, task_queue=f"wf-{uuid.uuid4().hex[:8]}", workflows=[SessionWorkflow, InvocationWorkflow],
                  activities=[settle_session, settle_invocation])


async def dispatch(client: Client, worker: Worker, notice: WorkflowNotice) -> WorkflowHandle:
    """Deliver one workflow-outbox row the way the dispatcher does (signal-with-start).

    The handle is the one signal-with-start returns (on the time-skipping server, its `result()`
    skips time); it is bound to the run it reached."""
    attrs = TypedSearchAttributes([SearchAttributePair(SearchAttributeKey.for_keyword(k), v)
                                   for k, v in notice.search_attributes.items()])
    return await client.start_workflow(
        notice.workflow_type, notice.start_args, id=notice.workflow_id, task_queue=worker.task_queue,
        start_signal=notice.signal, start_signal_args=[notice.payload], search_attributes=attrs,
        static_summary=notice.summary, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)


# ------------------------------------------------------------------------------------------ rows


def session_row(now: datetime, **over: Any) -> dict[str, Any]:
    """A `sessions` row as the storage functions RETURN it (SNAPSHOT_COLUMNS)."""
    row = {"id": f"s-{uuid.uuid4().hex[:8]}", "zone_id": ZONE, "application_id": "app-1", "lifecycle": "task",
           "status": "active", "state_version": 1, "parent_id": None, "root_id": None, "started_at": now,
           "ttl_seconds": 3600, "heartbeat_deadline_at": None, "lease_generation": 0, "termination_reason": None}
    row.update(over)
    row["root_id"] = row["root_id"] or row["id"]
    return row


def invocation_row(now: datetime, **over: Any) -> dict[str, Any]:
    row = {"id": f"i-{uuid.uuid4().hex[:8]}", "zone_id": ZONE, "service_id": "svc-1", "method": "search",
           "status": "running", "attempts": 1, "max_attempts": 2, "state_version": 2,
           "deadline_at": now + timedelta(seconds=10), "source_session_id": "s-caller"}
    row.update(over)
    return row


def snapshot(row: dict[str, Any]) -> SessionSnapshot:
    return SessionSnapshot(**session_snapshot(row))


async def state_of(handle: WorkflowHandle, result_type: type = SessionState) -> Any:
    return await handle.query("current_state", result_type=result_type)


async def details_of(handle: WorkflowHandle) -> str:
    return (await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)).current_details


async def history_events(handle: WorkflowHandle) -> list[Any]:
    return [e async for e in handle.fetch_history_events()]


def signals_named(events: list[Any], name: str) -> int:
    return sum(1 for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
               and e.workflow_execution_signaled_event_attributes.signal_name == name)


def summaries(events: list[Any], event_type: int) -> list[str]:
    return [json.loads(e.user_metadata.summary.data) for e in events if e.event_type == event_type]


async def replays(handle: WorkflowHandle) -> None:
    """The history the test produced replays on the current workflow code (determinism)."""
    await Replayer(workflows=[SessionWorkflow, InvocationWorkflow]).replay_workflow(await handle.fetch_history())


def count(events: list[Any], event_type: int) -> int:
    return sum(1 for e in events if e.event_type == event_type)


async def search_attribute(handle: WorkflowHandle, name: str) -> str | None:
    return (await handle.describe()).typed_search_attributes.get(SearchAttributeKey.for_keyword(name))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------ timers


async def test_ttl_expiry_settles_and_ends_the_workflow(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now, started_at=now - timedelta(seconds=3600 - 30))  # expires in 30 s
    calls: list[tuple[SettleCommand, datetime]] = []

    async def settle(cmd: SettleCommand) -> SessionSnapshot:
        calls.append((cmd, await env.get_current_time()))
        return snapshot({**row, "status": "expired", "state_version": 2, "termination_reason": "ttl"})

    async with worker_for(env.client, sessions=settle) as worker:
        handle = await dispatch(env.client, worker, session_notice(row, wc.SESSION_CREATED, "created task session"))
        assert await handle.result() == "expired"  # time skips to the TTL
        assert [c for c, _ in calls] == [SettleCommand(ZONE, row["id"])]
        assert calls[0][1] >= now + timedelta(seconds=30)
        state = await state_of(handle)
        assert state.current.status == "expired" and state.current.state_version == 2
        assert await search_attribute(handle, wc.SA_SESSION_STATUS) == "expired"
        assert "last: ttl expiry: expired with the subtree" in await details_of(handle)
        events = await history_events(handle)
        assert summaries(events, EventType.EVENT_TYPE_TIMER_STARTED) == ["ttl expiry"]
        assert summaries(events, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED) == \
            ["ttl expiry: expire the subtree if still due"]
        await replays(handle)


async def test_deadline_not_yet_due_in_postgres_is_retried(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now, started_at=now - timedelta(seconds=3600 - 5))
    calls: list[datetime] = []

    async def settle(cmd: SettleCommand) -> SessionSnapshot | None:
        calls.append(await env.get_current_time())
        if len(calls) == 1:  # the database clock is behind: nothing settled yet
            return snapshot(row)
        return None  # and then the row is gone: the workflow ends as terminated

    async with worker_for(env.client, sessions=settle) as worker:
        handle = await dispatch(env.client, worker, session_notice(row, wc.SESSION_CREATED, "created task session"))
        assert await handle.result() == "terminated"
        assert len(calls) == 2 and calls[1] - calls[0] >= timedelta(seconds=1)
        assert "last: ttl expiry: the session's row is gone, ending" in await details_of(handle)
        assert await search_attribute(handle, wc.SA_SESSION_STATUS) == "terminated"
        await replays(handle)


async def test_lease_renewed_by_heartbeats_rearms_then_lapses(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now, lifecycle="service", ttl_seconds=None, heartbeat_deadline_at=now + timedelta(seconds=20),
                      lease_generation=1)
    answers: list[SessionSnapshot] = []

    async def settle(cmd: SettleCommand) -> SessionSnapshot:
        at = await env.get_current_time()
        if not answers:  # heartbeats moved the lease: same state_version, later deadline
            answers.append(snapshot({**row, "heartbeat_deadline_at": at + timedelta(seconds=30)}))
        else:  # no heartbeat since: suspended with the subtree
            answers.append(snapshot({**row, "status": "suspended", "state_version": 2}))
        return answers[-1]

    async with worker_for(env.client, sessions=settle) as worker:
        handle = await dispatch(env.client, worker, session_notice(row, wc.SESSION_CREATED, "created service"))
        await env.sleep(timedelta(seconds=25))
        await eventually(lambda: _answered(answers, 1))
        state = await state_of(handle)
        assert state.current.status == "active"
        assert state.current.heartbeat_deadline_at == answers[0].heartbeat_deadline_at  # timer re-armed from it
        assert "renewed, timer re-armed" in await details_of(handle)

        await env.sleep(timedelta(seconds=40))
        await eventually(lambda: _answered(answers, 2))
        await eventually(lambda: _status(handle, "suspended"))
        state = await state_of(handle)
        assert state.current.state_version == 2
        assert await search_attribute(handle, wc.SA_SESSION_STATUS) == "suspended"
        assert "lease deadline: lease lost, suspended with the subtree" in await details_of(handle)
        events = await history_events(handle)
        assert count(events, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED) == 2
        assert count(events, EventType.EVENT_TYPE_TIMER_STARTED) == 2
        # A suspended service has no timer: it waits for the next notice.
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        ended = {**row, "status": "terminated", "state_version": 3, "termination_reason": "requested"}
        await dispatch(env.client, worker, session_notice(ended, wc.SESSION_TERMINATED, "terminated (requested)"))
        assert await handle.result() == "terminated"
        await replays(handle)


async def _answered(answers: list[Any], n: int) -> bool:
    return len(answers) >= n


async def _status(handle: WorkflowHandle, status: str, result_type: type = SessionState) -> bool:
    return (await state_of(handle, result_type)).current.status == status


async def test_invocation_deadline_fails_the_attempt_then_times_out(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = invocation_row(now)
    calls: list[SettleCommand] = []

    async def settle(cmd: SettleCommand) -> InvocationSnapshot:
        calls.append(cmd)
        status = "failed" if len(calls) == 1 else "timed_out"
        answer = {**current, "status": status, "state_version": current["state_version"] + 1}
        return InvocationSnapshot(**invocation_snapshot(answer))

    current = row
    async with worker_for(env.client, invocations=settle) as worker:
        handle = await dispatch(env.client, worker,
                                invocation_notice(row, wc.INVOCATION_STARTED, "attempt 1/2 started"))
        await env.sleep(timedelta(seconds=15))
        await eventually(lambda: _status(handle, "failed", InvocationState))
        assert calls == [SettleCommand(ZONE, row["id"])]
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING  # an attempt is left
        assert await search_attribute(handle, wc.SA_INVOCATION_STATUS) == "failed"
        assert "deadline exceeded: attempt 1/2 failed" in await details_of(handle)

        at = await env.get_current_time()
        current = {**row, "attempts": 2, "state_version": 4, "deadline_at": at + timedelta(seconds=10)}
        await dispatch(env.client, worker, invocation_notice(current, wc.INVOCATION_STARTED, "attempt 2/2 started"))
        assert await handle.result() == "timed_out"
        assert len(calls) == 2
        state = await state_of(handle, InvocationState)
        assert (state.current.status, state.current.attempts, state.current.state_version) == ("timed_out", 2, 5)
        assert await search_attribute(handle, wc.SA_INVOCATION_STATUS) == "timed_out"
        await replays(handle)


async def test_invocation_failed_without_attempts_left_ends(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = invocation_row(now, status="failed", attempts=2, max_attempts=2, state_version=5, deadline_at=None)
    async with worker_for(env.client) as worker:
        handle = await dispatch(env.client, worker, invocation_notice(row, wc.INVOCATION_COMPLETED, "failed"))
        assert await handle.result() == "failed"
        assert await search_attribute(handle, wc.SA_INVOCATION_STATUS) == "failed"


# ------------------------------------------------------------------------------------------ notices


async def test_repeated_notice_is_one_transition(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now)
    async with worker_for(env.client) as worker:
        handle = await dispatch(env.client, worker, session_notice(row, wc.SESSION_CREATED, "created task session"))
        await eventually(lambda: _details_contain(handle, "last: created task session"))
        suspended = session_notice({**row, "status": "suspended", "state_version": 2}, wc.SESSION_SUSPENDED,
                                   f"suspended with the subtree of {row['id']} (requested)", reason="requested")
        await dispatch(env.client, worker, suspended)
        await eventually(lambda: _status(handle, "suspended"))
        before = await state_of(handle)
        await dispatch(env.client, worker, suspended)  # at-least-once delivery: the same row again
        await eventually(lambda: _details_contain(handle, "last: repeated suspended v2: no change"))
        # A notice for another session reaching this workflow changes nothing either.
        other = session_notice(session_row(now, status="terminated", state_version=9), wc.SESSION_TERMINATED, "x")
        await handle.signal(wc.SESSION_TERMINATED, other.payload)
        await eventually(lambda: _details_contain(handle, "ignored terminated meant for session"))

        assert await state_of(handle) == before
        assert before.current.reason == "requested" and before.current.state_version == 2
        events = await history_events(handle)
        assert signals_named(events, wc.SESSION_SUSPENDED) == 2
        # One status change: one search-attribute upsert; the TTL timer keeps running (its deadline
        # holds while suspended): neither notice cancels or restarts it.
        assert count(events, EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES) == 1
        assert count(events, EventType.EVENT_TYPE_TIMER_STARTED) == 1
        assert count(events, EventType.EVENT_TYPE_TIMER_CANCELED) == 0
        assert await search_attribute(handle, wc.SA_SESSION_STATUS) == "suspended"
        details = await details_of(handle)
        assert details.startswith("suspended (requested) · task session of app-1 · expires ")
        await handle.terminate("test over")
        await replays(handle)


async def _details_contain(handle: WorkflowHandle, text: str) -> bool:
    return text in await details_of(handle)


async def test_out_of_order_notice_is_ignored(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now, parent_id="parent-1", root_id="root-1")
    async with worker_for(env.client) as worker:
        handle = await dispatch(env.client, worker, session_notice(row, wc.SESSION_CREATED, "created"))
        await dispatch(env.client, worker, session_notice(
            {**row, "status": "suspended", "state_version": 3}, wc.SESSION_SUSPENDED,
            "suspended with the subtree of root-1 (requested)", reason="requested"))
        await dispatch(env.client, worker, session_notice(
            {**row, "status": "active", "state_version": 2}, wc.SESSION_RESUMED, "resumed with the subtree of root-1"))
        await eventually(lambda: _details_contain(handle, "stale resumed v2 ignored (at v3)"))
        state = await state_of(handle)
        assert (state.current.status, state.current.state_version, state.current.reason) == (
            "suspended", 3, "requested")
        assert await search_attribute(handle, wc.SA_SESSION_STATUS) == "suspended"
        details = await details_of(handle)
        assert details.startswith("suspended (requested) · task session of app-1 · parent parent-1 · root root-1 · "
                                  "expires ")
        await handle.terminate("test over")
        await replays(handle)


async def test_delegation_notices_are_deduplicated_by_edge(env: WorkflowEnvironment):
    now = await env.get_current_time()
    row = session_row(now, parent_id="parent-1", root_id="parent-1")
    async with worker_for(env.client) as worker:
        handle = await dispatch(env.client, worker, session_notice(
            row, wc.SESSION_CREATED, "created, inheriting edge e0", edge_id="e0", peer_session_id="parent-1"))
        given = session_notice(row, wc.DELEGATION_GIVEN, "gave edge e1 to s-x (read)", edge_id="e1",
                               peer_session_id="s-x")
        for notice in (given, given,
                       session_notice(row, wc.DELEGATION_RECEIVED, "received edge e2 from s-y", edge_id="e2",
                                      peer_session_id="s-y"),
                       session_notice(row, wc.DELEGATION_ENDED, "edge e1 (given) revoked", edge_id="e1",
                                      peer_session_id="s-x"),
                       session_notice(row, wc.DELEGATION_ENDED, "edge e1 (given) revoked", edge_id="e1",
                                      peer_session_id="s-x"),
                       given):  # a late repeat after the end changes nothing
            await dispatch(env.client, worker, notice)
        await eventually(lambda: _signals(handle, 7))
        state = await state_of(handle)
        assert state.edges == {"e0": "received", "e2": "received", "e1": "ended"}
        assert state.current.state_version == 1 and state.current.status == "active"
        assert "last: repeated delegation_given of edge e1 ignored" in await details_of(handle)
        events = await history_events(handle)
        assert count(events, EventType.EVENT_TYPE_TIMER_STARTED) == 1  # no notice moved the TTL timer
        await handle.terminate("test over")
        await replays(handle)


async def _signals(handle: WorkflowHandle, n: int) -> bool:
    events = await history_events(handle)
    return count(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) >= n and \
        count(events, EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) >= 1 and \
        events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED


def test_edge_memory_is_bounded():
    edges: dict[str, str] = {}
    for i in range(EDGE_MEMORY + 50):  # ids sort like the UUIDv7 edge ids: oldest first
        assert remember_edge(edges, f"e{i:04d}", "given")
    assert len(edges) == EDGE_MEMORY and min(edges) == "e0050"
    assert not remember_edge(edges, "e0060", "given")
    assert remember_edge(edges, "e0060", "ended") and edges["e0060"] == "ended"
    assert not remember_edge(edges, "e0060", "received") and len(edges) == EDGE_MEMORY


# ------------------------------------------------------------------------------------------ continue-as-new


@pytest.fixture(scope="module")
async def dev_client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """A real dev server that suggests continue-as-new after 40 history events."""
    from devstack.temporal import free_port, start_temporal

    server = start_temporal(port=free_port(), log_file=tmp_path_factory.mktemp("temporal-can") / "temporal.log",
                            dynamic_config={"limit.historyCount.suggestContinueAsNew": 40})
    try:
        client = await Client.connect(server.address)
        yield client
    finally:
        server.stop()


async def test_continue_as_new_carries_the_state(dev_client: Client):
    now = datetime.now().astimezone()
    row = session_row(now, lifecycle="service", ttl_seconds=None, heartbeat_deadline_at=now + timedelta(hours=1),
                      lease_generation=1)
    async with worker_for(dev_client) as worker:
        first_run = (await dispatch(dev_client, worker, session_notice(row, wc.SESSION_CREATED, "created service"))
                     ).run_id
        handle = dev_client.get_workflow_handle(f"session/{ZONE}/{row['id']}")  # the latest run
        sent = 0
        while (await state_of(handle)).runs == 1:
            assert sent < 40, "continue-as-new was never suggested"
            await dispatch(dev_client, worker, session_notice(row, wc.DELEGATION_GIVEN, f"gave edge e{sent}",
                                                              edge_id=f"e{sent}", peer_session_id="s-x"))
            sent += 1
        await dispatch(dev_client, worker, session_notice(row, wc.DELEGATION_GIVEN, f"gave edge e{sent}",
                                                          edge_id=f"e{sent}", peer_session_id="s-x"))
        sent += 1
        await eventually(lambda: _edges(handle, sent))
        state = await state_of(handle)
        assert state.runs == 2 and state.current == snapshot(row)
        assert state.edges == {f"e{i}": "given" for i in range(sent)}
        description = await handle.describe()
        assert description.run_id != first_run
        assert description.typed_search_attributes.get(SearchAttributeKey.for_keyword(wc.SA_SESSION_STATUS)) == \
            "active"
        assert description.typed_search_attributes.get(SearchAttributeKey.for_keyword(wc.SA_ZONE)) == ZONE
        assert " · run 2" in await details_of(handle)
        # A repeat of an edge from the first run is still known as one.
        await dispatch(dev_client, worker, session_notice(row, wc.DELEGATION_GIVEN, "gave edge e0", edge_id="e0",
                                                          peer_session_id="s-x"))
        await eventually(lambda: _details_contain(handle, "repeated delegation_given of edge e0 ignored"))
        ended = {**row, "status": "terminated", "state_version": 2, "termination_reason": "requested"}
        await dispatch(dev_client, worker, session_notice(ended, wc.SESSION_TERMINATED, "terminated (requested)"))
        assert await handle.result() == "terminated"
        await replays(handle)  # the last run


async def _edges(handle: WorkflowHandle, n: int) -> bool:
    return len((await state_of(handle)).edges) >= n


async def test_notices_delivered_together_apply_in_order(env: WorkflowEnvironment):
    """The dispatcher sends several claimed rows of one workflow as one `notices` signal."""
    now = await env.get_current_time()
    row = session_row(now)
    rows = [session_notice(row, wc.SESSION_CREATED, "created"),
            session_notice({**row, "status": "suspended", "state_version": 2}, wc.SESSION_SUSPENDED, "suspended",
                           reason="requested"),
            session_notice({**row, "status": "active", "state_version": 3}, wc.SESSION_RESUMED, "resumed"),
            session_notice(row, wc.DELEGATION_GIVEN, "gave edge e1", edge_id="e1", peer_session_id="s-x")]
    async with worker_for(env.client) as worker:
        first = rows[0]
        attrs = TypedSearchAttributes([SearchAttributePair(SearchAttributeKey.for_keyword(k), v)
                                       for k, v in first.search_attributes.items()])
        handle = await env.client.start_workflow(
            first.workflow_type, first.start_args, id=first.workflow_id, task_queue=worker.task_queue,
            start_signal=wc.NOTICES, start_signal_args=[[{"signal": r.signal, "notice": r.payload} for r in rows]],
            search_attributes=attrs, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
        await eventually(lambda: _details_contain(handle, "last: gave edge e1"))
        state = await state_of(handle)
        assert state.current.status == "active" and state.current.state_version == 3
        assert state.edges == {"e1": "given"}
        events = await history_events(handle)
        assert signals_named(events, wc.NOTICES) == 1
        # suspended, then active again: both status changes reached the search attribute
        assert count(events, EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES) == 2
        await handle.terminate("test over")
    await replays(handle)
