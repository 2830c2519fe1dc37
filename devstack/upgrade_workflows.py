"""Move a running deployment from the update-driven workflow types (`Session`, `Invocation`) to the
signal-driven ones (`AgentSession`, `AgentInvocation`): `python -m devstack.upgrade_workflows`.

Terminates every running workflow of the old types, then writes a `sync` notice for every live
session and invocation, so the dispatcher starts its new workflow from the row (Postgres holds all
state; the old histories are not needed). Safe to run twice. Settings from the environment
(DATABASE_URL, TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_TASK_QUEUE).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rules import workflow_contract as wc
from rules.workflow_contract import LEGACY_WORKFLOW_TYPES

if TYPE_CHECKING:
    from settings import Settings


async def upgrade(settings: Settings | None = None) -> tuple[int, int]:
    from settings import get_settings
    from storage import workflow_outbox
    from storage.db import Database
    from worker import connect_temporal

    settings = settings or get_settings()
    client = await connect_temporal(settings, attempts=5)
    query = " OR ".join(f'WorkflowType = "{t}"' for t in LEGACY_WORKFLOW_TYPES)
    terminated = 0
    async for wf in client.list_workflows(f"({query}) AND ExecutionStatus = \"Running\""):
        await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate(reason="upgrade to signal-driven workflows")
        terminated += 1
    db = Database(settings.DATABASE_URL, max_size=1, task_queue=settings.TEMPORAL_TASK_QUEUE)
    await db.open()
    try:
        # No running id is known to belong to the new types yet: every live entity gets a sync, a
        # batch per transaction; the ids queued so far are passed as running, so an entity whose
        # notice the dispatcher has delivered meanwhile is not queued twice.
        queued_sessions: set[str] = set()
        queued_invocations: set[str] = set()
        while True:
            async with db.transaction() as conn:
                missing = await workflow_outbox.missing_candidates(
                    conn, queued_sessions, queued_invocations, 0, 1000)
                if not await workflow_outbox.start_missing(conn, missing):
                    break
            queued_sessions.update(wc.session_workflow_id(r["zone_id"], r["id"]) for r in missing.sessions)
            queued_invocations.update(wc.invocation_workflow_id(r["zone_id"], r["id"]) for r in missing.invocations)
        started = len(queued_sessions) + len(queued_invocations)
    finally:
        await db.close()
    return terminated, started


def main() -> int:
    terminated, started = asyncio.run(upgrade())
    print(f"terminated {terminated} old workflow(s); queued {started} sync notice(s) for the dispatcher")
    return 0


if __name__ == "__main__":
    sys.exit(main())
