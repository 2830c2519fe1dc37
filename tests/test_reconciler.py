"""The reconciler starts the workflow of a live session that has none, and never adds to a backlog."""

from __future__ import annotations

import uuid

from temporalio.client import WorkflowExecutionStatus

from maintenance.reconciler import Reconciler
from rules import workflow_contract as wc
from storage import notice_dispatch
from tests.conftest import Zone, eventually


def reconciler(zone: Zone, **overrides) -> Reconciler:
    """The maintenance activities' reconciler on the zone's stack, run on demand: no interval, no
    grace (the sessions here are seconds old)."""
    settings = zone.stack.settings.model_copy(update={"RECONCILE_INTERVAL_SECONDS": 0, "RECONCILE_GRACE_SECONDS": 0,
                                                      **overrides})
    return Reconciler(zone.stack.db, settings, zone.stack.client)


async def lost_workflow(zone: Zone) -> tuple[str, str]:
    """A live session whose workflow was terminated by hand: its id and workflow id."""
    session_id = (await zone.start())["agent_session_id"]
    workflow_id = wc.session_workflow_id(zone.id, session_id)
    handle = zone.stack.client.get_workflow_handle(workflow_id)

    async def running() -> bool:
        try:
            return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        except Exception:  # noqa: BLE001 — not started yet
            return False

    await eventually(running, timeout=15)
    await handle.terminate("lost by hand")
    return session_id, workflow_id


async def sync_notices(zone: Zone, workflow_id: str) -> int:
    return await zone.stack.db.fetchval(
        "SELECT count(*) FROM workflow_outbox WHERE workflow_id = %s AND signal = %s", (workflow_id, wc.SESSION_SYNC))


async def test_while_notices_wait_the_reconciler_starts_nothing_and_once_delivered_it_restarts_the_lost_workflow(
        zone: Zone):
    session_id, workflow_id = await lost_workflow(zone)
    # A real backlog: 300 notices no dispatcher takes (their task queue has none), waiting longer
    # than the follow-lag target. The lost session's own notice queue is empty, so the code that
    # only looked for a queued notice of the session itself would start it now, behind them.
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    await zone.stack.db.execute("""
        INSERT INTO workflow_outbox (workflow_id, workflow_type, signal, payload, start_args, search_attributes,
                                     summary, due_at, task_queue, created_at)
        SELECT 'session/' || %(zone)s || '/waiting-' || g, %(type)s, %(signal)s, '{}', '{}', '{}', 'waiting',
               now() + interval '1 hour', %(queue)s, now() - interval '10 seconds'
        FROM generate_series(1, 300) g""",
        {"zone": zone.id, "type": wc.SESSION_WORKFLOW, "signal": wc.SESSION_SYNC, "queue": queue})
    started_before = await notice_dispatch.counter(zone.stack.db, "reconciler_started")
    quiet_before = await notice_dispatch.counter(zone.stack.db, "reconciler_quiet_runs")
    try:
        assert await reconciler(zone, FOLLOW_LAG_TARGET_SECONDS=5).reconcile() == 0
        assert await sync_notices(zone, workflow_id) == 0
        assert await notice_dispatch.counter(zone.stack.db, "reconciler_quiet_runs") == quiet_before + 1
    finally:
        await zone.stack.db.execute("DELETE FROM workflow_outbox WHERE task_queue = %s", (queue,))
    assert await notice_dispatch.counter(zone.stack.db, "reconciler_started") == started_before

    # The backlog gone: the lost workflow is started again, once, and follows its row. (Other
    # tests leave live rows without workflows in the shared database: the run may start those too.)
    assert await reconciler(zone).reconcile() >= 1
    assert await notice_dispatch.counter(zone.stack.db, "reconciler_started") >= started_before + 1
    handle = zone.stack.client.get_workflow_handle(workflow_id)

    async def running_again() -> bool:
        return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    await eventually(running_again, timeout=15)
    # Its workflow running, another run gives it no notice: its history holds the one `sync`.
    await reconciler(zone).reconcile()
    await zone.stack.workflows_caught_up()

    async def signals() -> list[str]:
        history = await handle.fetch_history()
        return [e.workflow_execution_signaled_event_attributes.signal_name for e in history.events
                if e.HasField("workflow_execution_signaled_event_attributes")]

    assert await signals() == [wc.SESSION_SYNC]
    assert (await zone.session_row(session_id))["status"] == "active"

