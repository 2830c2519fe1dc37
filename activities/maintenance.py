"""The maintenance activity: edge expiry settlement and retention (reference §9)."""

from __future__ import annotations

from temporalio import activity

from settings import Settings
from storage import delegations as store
from storage.db import Database
from workflows.models import RUN_MAINTENANCE


class MaintenanceActivities:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

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
        return {"expired_edges": expired, **counts}
