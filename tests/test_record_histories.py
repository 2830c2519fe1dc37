"""Records the workflow histories that tests/test_replay.py replays.

Skipped in a normal run; `make record-histories` sets RECORD_HISTORIES=1 and writes
tests/histories/<RECORD_SET>/*.json from live runs of every workflow path against the real servers.
Older sets stay: they are histories of workflows already running somewhere, which every later
version of the code must still replay. After a `workflow.patched` change, bump RECORD_SET.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import Zone, eventually, seed_zone
from workflows.models import invocation_workflow_id, session_workflow_id

RECORD_SET = "v4"
HISTORIES = Path(__file__).parent / "histories" / RECORD_SET

pytestmark = pytest.mark.skipif(os.environ.get("RECORD_HISTORIES") != "1",
                                reason="set RECORD_HISTORIES=1 (make record-histories) to re-record histories")


async def _save(zone_stack, workflow_id: str, name: str, *, run_id: str | None = None) -> None:
    handle = zone_stack.client.get_workflow_handle(workflow_id, run_id=run_id)
    history = await handle.fetch_history()
    HISTORIES.mkdir(parents=True, exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())


async def _completed(stack, workflow_id: str) -> None:
    from temporalio.service import RPCError, RPCStatusCode

    async def done():
        try:
            desc = await stack.client.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:  # not started yet: the dispatcher is behind
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return desc.status.name == "COMPLETED"
    await eventually(done, timeout=15)


async def test_record_task_session_paths(zone: Zone):
    root = (await zone.start())["agent_session_id"]
    child = (await zone.start(parent_id=root))["agent_session_id"]
    h = zone.headers()
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{root}/suspend", headers=h)).status_code == 200
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{root}/suspend", headers=h)).status_code == 409
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{root}/resume", headers=h)).status_code == 200
    assert (await zone.http.delete(f"/zones/{zone.id}/agents/{root}", headers=h)).status_code == 204
    for sid, name in ((root, "session_task_lifecycle"), (child, "session_task_child_cascade")):
        await _completed(zone.stack, session_workflow_id(zone.id, sid))
        await _save(zone.stack, session_workflow_id(zone.id, sid), name)


async def test_record_reconciler_start(zone: Zone):
    """A live session whose workflow was lost: the reconciler's `sync` notice starts it again."""
    from storage.notices import enqueue, session_notice
    from rules.workflow_contract import SESSION_SYNC

    sid = (await zone.start())["agent_session_id"]
    wf = session_workflow_id(zone.id, sid)
    await zone.stack.workflows_caught_up()
    await zone.stack.client.get_workflow_handle(wf).terminate(reason="lost (history recording)")
    async with zone.stack.db.transaction() as conn:
        row = await conn.execute("SELECT * FROM sessions s WHERE s.id = %s", (sid,))
        await enqueue(conn, [session_notice(await row.fetchone(), SESSION_SYNC, "reconciler: workflow was missing")])
    await zone.stack.workflows_caught_up()
    assert (await zone.http.delete(f"/zones/{zone.id}/agents/{sid}", headers=zone.headers())).status_code == 204
    await _completed(zone.stack, wf)
    await _save(zone.stack, wf, "session_reconciler_sync")


async def test_record_ttl_expiry_cascade(zone: Zone):
    root = (await zone.start(ttl_seconds=1))["agent_session_id"]
    child = (await zone.start(parent_id=root))["agent_session_id"]
    for sid, name in ((root, "session_ttl_expired"), (child, "session_ttl_child_terminated")):
        await _completed(zone.stack, session_workflow_id(zone.id, sid))
        await _save(zone.stack, session_workflow_id(zone.id, sid), name)


async def test_record_service_paths(stack_factory, signing_key):
    stack = await stack_factory(SERVICE_AGENT_LEASE_SECONDS=2)
    try:
        zone = await seed_zone(stack, signing_key)
        sid = (await zone.start(lifecycle="service"))["agent_session_id"]
        h = zone.headers()
        for _ in range(3):
            r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/heartbeat", json={"lease_generation": 1},
                                     headers=h)
            assert r.status_code == 200
        r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/lease", headers=h)
        assert r.json()["lease_generation"] == 2
        # Lease loss: stop heartbeating; the workflow's lease timer suspends the session.
        await eventually(lambda: _status(zone, sid, "suspended"), timeout=6)
        assert (await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=h)).status_code == 200
        # Grow the history past the test server's continue-as-new suggestion (how many transitions
        # that takes depends on how many notices the dispatcher delivers together).
        wf = session_workflow_id(zone.id, sid)

        async def first_run_continued():
            runs = [w async for w in stack.client.list_workflows(f'WorkflowId = "{wf}"')]
            first = min(runs, key=lambda w: w.start_time)
            return first if first.status.name == "CONTINUED_AS_NEW" else None
        first = None
        for _ in range(20):
            for _ in range(10):
                await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=h)
                await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=h)
                await asyncio.sleep(0.15)  # past the dispatcher's linger: one signal each
            await stack.workflows_caught_up()
            first = await first_run_continued()
            if first is not None:
                break
        assert first is not None, "the service session's workflow never continued as new"
        await _save(stack, wf, "session_service_lease_loss_takeover_can", run_id=first.run_id)
        r = await zone.http.request("DELETE", f"/zones/{zone.id}/agents/{sid}", json={"lease_generation": 2}, headers=h)
        assert r.status_code == 204, r.text
        await _completed(stack, wf)
        await _save(stack, wf, "session_service_after_continue_as_new")
    finally:
        await stack.close()


async def _status(zone: Zone, sid: str, status: str) -> bool:
    return (await zone.session_row(sid))["status"] == status


async def test_record_invocation_paths(zone: Zone):
    h = zone.headers()
    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=h,
                             json={"application_id": "app-1", "endpoint_url": "https://svc.example/a"})
    service = r.json()["id"]

    async def create(key: str, **extra):
        r = await zone.http.post(f"/zones/{zone.id}/invocations", headers=h,
                                 json={"service_id": service, "idempotency_key": key, "method": "run", **extra})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    async def patch(inv: str, action: str, body=None):
        r = await zone.http.patch(f"/zones/{zone.id}/invocations/{inv}/{action}", headers=h, json=body)
        assert r.status_code == 200, r.text

    retried = await create("retry")
    await patch(retried, "start")
    await patch(retried, "complete", {"status": "failed", "error": {"code": "x"}})
    await patch(retried, "start")
    await patch(retried, "complete", {"status": "succeeded"})
    canceled = await create("cancel")
    await patch(canceled, "cancel", {"reason": "not needed"})
    timed = await create("deadline", timeout_ms=300, retry_policy={"max_attempts": 1})
    await patch(timed, "start")
    for inv, name in ((retried, "invocation_fail_retry_succeed"), (canceled, "invocation_canceled"),
                      (timed, "invocation_deadline_timed_out")):
        await _completed(zone.stack, invocation_workflow_id(zone.id, inv))
        await _save(zone.stack, invocation_workflow_id(zone.id, inv), name)


async def test_record_delegate_and_revoke_cascade(zone: Zone):
    a = (await zone.start())["agent_session_id"]
    b = (await zone.start())["agent_session_id"]
    c = (await zone.start())["agent_session_id"]
    h = zone.headers()
    edge = {"issuer_application_id": "app-1", "receiver_application_id": "app-1", "resource_id": "res-1",
            "scopes": ["read"]}
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=h, json={
        **edge, "source_session_id": a, "target_session_id": b, "constraints": {"max_hops": 3}, "ttl_seconds": 600})
    e1 = r.json()["delegation_edge_id"]
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=h, json={
        **edge, "source_session_id": b, "target_session_id": c, "constraints": {"max_hops": 2}, "ttl_seconds": 300})
    assert r.status_code == 201, r.text
    r = await zone.http.patch(f"/zones/{zone.id}/delegations/{e1}/revoke", headers=h)
    assert r.json()["terminated_sessions"] == 2
    await _completed(zone.stack, session_workflow_id(zone.id, c))
    assert (await zone.http.delete(f"/zones/{zone.id}/agents/{a}", headers=h)).status_code == 204
    await _completed(zone.stack, session_workflow_id(zone.id, a))
    await _save(zone.stack, session_workflow_id(zone.id, a), "session_delegate_revoke_source")
    await _save(zone.stack, session_workflow_id(zone.id, c), "session_revoked_target")


async def test_record_maintenance_run(stack):
    from worker import maintenance_schedule_id

    handle = stack.client.get_schedule_handle(maintenance_schedule_id(stack.settings))
    desc = await handle.describe()
    await eventually(lambda: _has_run(handle), timeout=12)
    desc = await handle.describe()
    action = desc.info.recent_actions[-1].action
    await _completed(stack, action.workflow_id)
    await _save(stack, action.workflow_id, "maintenance_run", run_id=action.first_execution_run_id)


async def _has_run(handle) -> bool:
    desc = await handle.describe()
    return bool(desc.info.recent_actions)
