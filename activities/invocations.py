"""Invocation activities: what an invocation workflow's timer does when it fires.

Create, start, cancel and complete are command transactions run by the API (docs/DESIGN.md, "Postgres
decides, Temporal follows"); only the running deadline is driven from the workflow.
"""

from __future__ import annotations

from temporalio import activity

from settings import Settings
from storage import invocations as store
from storage.db import Database
from storage.notices import invocation_snapshot
from workflows import models as m


class InvocationActivities:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    @activity.defn(name=m.SETTLE_INVOCATION_DEADLINE)
    async def settle_invocation_deadline(self, cmd: m.SettleCommand) -> m.InvocationSnapshot | None:
        """Fail the running attempt past its deadline (timed_out on the last one), if still due.

        One transaction, which also writes the invocation's `completed` notice; idempotent (a
        retry finds it no longer running or the deadline moved). Returns the invocation's state
        after the transaction, None when its row is gone.
        """
        async with self.db.transaction() as conn:
            await store.settle_deadline(conn, cmd.zone_id, cmd.entity_id)
            row = await store.get(conn, cmd.zone_id, cmd.entity_id)
        return m.InvocationSnapshot(**invocation_snapshot(row)) if row is not None else None
