"""Replay every committed workflow history (tests/histories/*.json) against the current workflow
code. A change that breaks determinism fails here; guard such changes with `workflow.patched`.
Re-record with `make record-histories`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from worker import build_workflows
from workflows.models import SESSION_WORKFLOW, SessionState
from workflows.session import SessionWorkflow

HISTORY_DIR = Path(__file__).parent / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("*/*.json"))
EXPECTED = {"session_task_lifecycle", "session_task_child_cascade", "session_reconciler_sync", "session_ttl_expired",
            "session_ttl_child_terminated", "session_service_lease_loss_takeover_can",
            "session_service_after_continue_as_new", "invocation_fail_retry_succeed", "invocation_canceled",
            "invocation_deadline_timed_out", "session_delegate_revoke_source", "session_revoked_target",
            "maintenance_run"}


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_every_workflow_path_has_a_committed_history():
    for recorded_set in HISTORY_DIR.iterdir():
        assert EXPECTED <= {p.stem for p in recorded_set.glob("*.json")}, recorded_set.name


@pytest.mark.parametrize("path", HISTORIES, ids=[f"{p.parent.name}/{p.stem}" for p in HISTORIES])
async def test_history_replays_on_current_code(path: Path):
    await Replayer(workflows=build_workflows()).replay_workflow(load(path))


@workflow.defn(name=SESSION_WORKFLOW, sandboxed=False)
class SessionWorkflowWithExtraTimer(SessionWorkflow):
    """A deliberately non-deterministic change: a new timer before the run loop."""

    @workflow.run
    async def run(self, state: SessionState) -> str:
        await workflow.sleep(0.01)
        return await super().run(state)


async def test_nondeterministic_change_fails_replay():
    path = HISTORY_DIR / "v3" / "session_task_lifecycle.json"
    with pytest.raises(workflow.NondeterminismError):
        await Replayer(workflows=[SessionWorkflowWithExtraTimer]).replay_workflow(load(path))
