"""The maintenance activity: edge expiry and retention, then the workflow reconciler (maintenance/)."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from maintenance.reconciler import Reconciler
from maintenance.retention import expire_and_clean
from settings import Settings
from storage.db import Database
from workflows.models import RUN_MAINTENANCE


class MaintenanceActivities:
    def __init__(self, db: Database, settings: Settings, client: Client | None = None) -> None:
        self.db = db
        self.settings = settings
        self.reconciler = Reconciler(db, settings, client)

    @activity.defn(name=RUN_MAINTENANCE)
    async def run_maintenance(self) -> dict:
        counts = await expire_and_clean(self.db, self.settings)
        return {**counts, "reconciled_workflows": await self.reconciler.reconcile()}
