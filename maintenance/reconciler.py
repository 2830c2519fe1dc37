"""The workflow reconciler: starts the workflow of every live session or invocation that has none
(a lost namespace, a restored backup, a workflow terminated by hand) with a `sync` notice through the
workflow outbox. Run by the maintenance activity, at most once per RECONCILE_INTERVAL_SECONDS."""

from __future__ import annotations

import logging

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from notices.dispatcher import workflow_task_backlog
from rules import workflow_contract as wc
from settings import Settings
from storage import maintenance as store
from storage.db import Database

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, db: Database, settings: Settings, client: Client | None) -> None:
        self.db = db
        self.settings = settings
        self.client = client

    async def reconcile(self) -> int:
        """Start the workflow of every live session or invocation that has none (a lost namespace,
        a restored backup, a workflow terminated by hand): a `sync` notice through the outbox.

        It never adds to a backlog: while a notice waits longer than FOLLOW_LAG_TARGET_SECONDS
        or Temporal's workflow-task queue is over DISPATCH_MAX_TEMPORAL_BACKLOG it does nothing (the
        notices on their way start or update those workflows, and Temporal's visibility lags then);
        Temporal unreachable, nothing either; and a workflow the visibility listing misses counts as
        missing only once DescribeWorkflowExecution (the history service, not visibility) agrees."""
        client = self.client
        if client is None:
            return 0
        settings = self.settings
        async with self.db.transaction() as conn:
            if not await store.claim_interval(
                    conn, "reconciler_last_run", settings.RECONCILE_INTERVAL_SECONDS):
                return 0
            waited = await store.oldest_waiting_notice_age(conn)
            live = await store.live_counts(conn)
        try:
            quiet = await self._quiet_reason(client, waited)
            if quiet:
                await self._count_quiet(quiet)
                return 0
            running: dict[str, set[str] | None] = {}
            for kind, workflow_type in (("sessions", wc.SESSION_WORKFLOW), ("invocations", wc.INVOCATION_WORKFLOW)):
                query = f'WorkflowType = "{workflow_type}" AND ExecutionStatus = "Running"'
                # Counting is one cheap call; the ids are listed only when some workflow is missing.
                if live[kind] == 0 or (await client.count_workflows(query)).count >= live[kind]:
                    running[kind] = None
                    continue
                running[kind] = {w.id async for w in client.list_workflows(query, page_size=1000)}
            if running["sessions"] is None and running["invocations"] is None:
                return 0
            async with self.db.transaction() as conn:
                candidates = await store.missing_candidates(
                    conn, _Everything() if running["sessions"] is None else running["sessions"],
                    _Everything() if running["invocations"] is None else running["invocations"],
                    settings.RECONCILE_GRACE_SECONDS, settings.RECONCILE_MAX_STARTS)
            missing = [w for w in candidates.workflow_ids() if not await _has_running_workflow(client, w)]
        except RPCError as exc:
            log.info("reconciler: Temporal unreachable (%s), nothing started", exc.status)
            await self._count_quiet("temporal unreachable")
            return 0
        if not missing:
            return 0
        async with self.db.transaction() as conn:
            # Re-checked in the transaction that writes the notices: a command may have queued one since.
            confirmed = await store.missing_candidates(
                conn, set(), set(), settings.RECONCILE_GRACE_SECONDS, settings.RECONCILE_MAX_STARTS,
                only_workflow_ids=missing)
            started = await store.start_missing(conn, confirmed)
        if started:
            log.warning("reconciler: started %d missing workflow(s)", started)
        return started

    async def _quiet_reason(self, client: Client, oldest_notice_age_s: float) -> str | None:
        """Why the reconciler must not start anything now, if it must not."""
        if oldest_notice_age_s > self.settings.FOLLOW_LAG_TARGET_SECONDS:
            return f"dispatchers behind: a notice has waited {oldest_notice_age_s:.1f} s"
        limit = self.settings.DISPATCH_MAX_TEMPORAL_BACKLOG
        backlog = await workflow_task_backlog(client, self.settings.TEMPORAL_TASK_QUEUE)
        if limit and backlog > limit:
            return f"Temporal behind: {backlog} workflow tasks queued"
        return None

    async def _count_quiet(self, reason: str) -> None:
        log.info("reconciler: quiet (%s)", reason)
        async with self.db.transaction() as conn:
            await store.add_counter(conn, "reconciler_quiet_runs", 1)


class _Everything(set):
    """Stands for "every workflow of this kind is running" without listing them."""

    def __contains__(self, item: object) -> bool:
        return True


async def _has_running_workflow(client: Client, workflow_id: str) -> bool:
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return described.status == WorkflowExecutionStatus.RUNNING
