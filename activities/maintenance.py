"""The maintenance activity: edge expiry, retention (reference §9) and the workflow reconciler."""

from __future__ import annotations

import logging

from temporalio import activity
from temporalio.client import Client

from rules import workflow_contract as wc
from settings import Settings
from storage import delegations as store
from storage import workflow_outbox
from storage.db import Database
from workflows.models import RUN_MAINTENANCE

log = logging.getLogger(__name__)


class MaintenanceActivities:
    def __init__(self, db: Database, settings: Settings, client: Client | None = None) -> None:
        self.db = db
        self.settings = settings
        self.client = client

    @activity.defn(name=RUN_MAINTENANCE)
    async def run_maintenance(self) -> dict:
        batch = self.settings.RETENTION_CLEANUP_BATCH_SIZE
        expired = 0
        while True:  # each batch its own short transaction
            async with self.db.transaction() as conn:
                n = await store.expire_edges(conn, batch)
            expired += n
            if n < batch:
                break
        async with self.db.transaction() as conn:
            counts = await store.retention(conn, self.settings)
        return {"expired_edges": expired, **counts, "reconciled_workflows": await self.reconcile()}

    async def reconcile(self) -> int:
        """Start the workflow of every live session or invocation that has none (a lost namespace,
        a restored backup, a workflow terminated by hand): a `sync` notice through the outbox."""
        if self.client is None:
            return 0
        async with self.db.transaction() as conn:
            if not await workflow_outbox.claim_interval(conn, "reconciler_last_run",
                                                        self.settings.RECONCILE_INTERVAL_SECONDS):
                return 0
            live = await workflow_outbox.live_counts(conn)
        running: dict[str, set[str] | None] = {}
        for kind, workflow_type in (("sessions", wc.SESSION_WORKFLOW), ("invocations", wc.INVOCATION_WORKFLOW)):
            query = f'WorkflowType = "{workflow_type}" AND ExecutionStatus = "Running"'
            # Counting is one cheap call; the ids are listed only when some workflow is missing.
            if live[kind] == 0 or (await self.client.count_workflows(query)).count >= live[kind]:
                running[kind] = None
                continue
            running[kind] = {w.id async for w in self.client.list_workflows(query, page_size=1000)}
        if running["sessions"] is None and running["invocations"] is None:
            return 0
        async with self.db.transaction() as conn:
            started = await workflow_outbox.start_missing(
                conn, running["sessions"] if running["sessions"] is not None else _Everything(),
                running["invocations"] if running["invocations"] is not None else _Everything(),
                self.settings.RECONCILE_GRACE_SECONDS)
        if started:
            log.warning("reconciler: started %d missing workflow(s)", started)
        return started


class _Everything(set):
    """Stands for "every workflow of this kind is running" without listing them."""

    def __contains__(self, item: object) -> bool:
        return True
