"""Maintenance: started by a Temporal Schedule every few seconds (overlaps skipped).

Settles lapsed delegation edges (status `expired`, one epoch bump and one `edge_expire` event per
zone) and runs the retention clean-up of reference §9. The work is one activity; the workflow
exists so every run is visible, with its counts, in the Temporal UI.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.common import DURABLE_RETRY
    from workflows.models import RUN_MAINTENANCE


@workflow.defn(name="Maintenance")
class MaintenanceWorkflow:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        counts: dict[str, Any] = await workflow.execute_activity(
            RUN_MAINTENANCE, result_type=dict, start_to_close_timeout=timedelta(minutes=2),
            retry_policy=DURABLE_RETRY, summary="expire edges, retention")
        return counts
