"""Session activities: what a session workflow's timer does when it fires.

Every other session change is a command transaction run by the API (docs/DESIGN.md, "Postgres decides,
Temporal follows"); only time is driven from the workflow.
"""

from __future__ import annotations

from temporalio import activity

from settings import Settings
from storage import sessions as store
from storage.db import Database
from storage.notices import session_snapshot
from workflows import models as m


class SessionActivities:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    @activity.defn(name=m.SETTLE_SESSION_DEADLINE)
    async def settle_session_deadline(self, cmd: m.SettleCommand) -> m.SessionSnapshot | None:
        """Expire the task past its TTL or suspend the service past its lease, if still due.

        One transaction; it writes the workflow-outbox notices of every session it changed (this
        one included), so nothing is signalled from here. Idempotent: a retry finds the deadline
        settled (or moved by heartbeats) and changes nothing. Returns the session's state after
        the transaction, None when its row is gone.
        """
        async with self.db.transaction() as conn:
            row = await store.settle_deadline(conn, cmd.zone_id, cmd.entity_id)
        return m.SessionSnapshot(**session_snapshot(row)) if row is not None else None
