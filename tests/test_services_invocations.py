"""Service sessions, heartbeats, lease takeover and invocations against the real stack (no mocks).

Covers reference-behaviour §13 cases 20 and 60-76, plus what we do differently (docs/DESIGN.md,
sdk-wire-contract §4.5/§9): lease_generation fencing and takeover, durable lease and invocation
deadline timers (settled within about a second), per-transition outbox keys, continue-as-new of a
long-lived service session, and the published `caracalai-sdk` client driving the lease flow.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from rules.idempotency import key_digest
from storage import notice_dispatch
from tests.conftest import Stack, Zone, eventually, notices_in, seed_zone
from workflows.models import invocation_workflow_id, session_workflow_id

LIFECYCLE = "caracal.agents.lifecycle"
REVOKE = "caracal.sessions.revoke"
INVOCATIONS = "caracal.invocations.lifecycle"
ROOT = Path(__file__).resolve().parent.parent

SERVICE_KEYS = {"id", "zone_id", "application_id", "endpoint_url", "protocol_versions", "framework_name",
                "framework_version", "capabilities", "health", "metadata_json", "last_heartbeat_at"}
AGENT_KEYS = {"id", "agent_session_id", "zone_id", "application_id", "status", "last_active_at",
              "last_heartbeat_at", "heartbeat_deadline_at", "lease_generation"}
INVOCATION_KEYS = {"id", "zone_id", "service_id", "source_session_id", "target_session_id", "method", "status",
                   "attempts", "max_attempts", "timeout_ms", "retry_policy_json", "deadline_at",
                   "cancel_requested_at", "started_at", "completed_at", "created_at"}


# ------------------------------------------------------------------------------------------------
# helpers


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def near(value: float, expected: float, tol: float = 2.0) -> bool:
    return abs(value - expected) <= tol


async def db_now(zone: Zone) -> float:
    return (await zone.stack.db.fetchrow("SELECT now() AS t"))["t"].timestamp()


async def heartbeat(zone: Zone, sid: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return await zone.http.post(f"/zones/{zone.id}/agents/{sid}/heartbeat", json=body,
                                headers=headers or zone.headers())


async def take_lease(zone: Zone, sid: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return await zone.http.post(f"/zones/{zone.id}/agents/{sid}/lease", headers=headers or zone.headers())


async def delete(zone: Zone, sid: str, headers: dict[str, str] | None = None, body: Any = None) -> httpx.Response:
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    return await zone.http.request("DELETE", f"/zones/{zone.id}/agents/{sid}", headers=headers or zone.headers(),
                                   **kw)


async def register(zone: Zone, app: str = "app-1", endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers(app), json={
        "application_id": app, "endpoint_url": endpoint or f"https://svc.example/{uuid.uuid4().hex[:8]}", **extra})
    assert r.status_code == 201, r.text
    return r.json()


async def create_invocation(zone: Zone, service_id: str, key: str | None = None,
                            headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    body = {"service_id": service_id, "idempotency_key": key or f"k-{uuid.uuid4().hex}", "method": "run", **body}
    return await zone.http.post(f"/zones/{zone.id}/invocations", json=body, headers=headers or zone.headers())


async def new_invocation(zone: Zone, service_id: str, **body: Any) -> dict[str, Any]:
    r = await create_invocation(zone, service_id, **body)
    assert r.status_code == 201, r.text
    return r.json()


async def patch(zone: Zone, inv: str, action: str, body: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    return await zone.http.patch(f"/zones/{zone.id}/invocations/{inv}/{action}", headers=headers or zone.headers(),
                                 **kw)


async def get_invocation(zone: Zone, inv: str) -> dict[str, Any]:
    r = await zone.http.get(f"/zones/{zone.id}/invocations/{inv}", headers=zone.headers())
    assert r.status_code == 200, r.text
    return r.json()


async def invocation_row(zone: Zone, inv: str) -> dict[str, Any]:
    return await zone.stack.db.fetchrow("SELECT * FROM agent_invocations WHERE id = %s", (inv,))


async def keys_for(zone: Zone, topic: str, entity: str) -> list[str]:
    return [e["dedupe_key"] for e in await zone.events(topic) if entity in e["dedupe_key"]]


async def events_for(zone: Zone, topic: str, entity: str) -> list[dict[str, Any]]:
    return [e for e in await zone.events(topic) if entity in e["dedupe_key"]]


async def session_state(stack: Stack, zone_id: str, sid: str) -> dict[str, Any]:
    """The session as its workflow knows it, once the notices written so far are delivered."""
    wf = session_workflow_id(zone_id, sid)
    await eventually(lambda: notice_dispatch.delivered(stack.db, wf), timeout=15)
    return (await stack.client.get_workflow_handle(wf).query("current_state"))["current"]


async def workflow_status(stack: Stack, workflow_id: str) -> WorkflowExecutionStatus:
    return (await stack.client.get_workflow_handle(workflow_id).describe()).status


def error(r: httpx.Response) -> tuple[int, str | None]:
    try:
        return r.status_code, r.json().get("error")
    except ValueError:
        return r.status_code, None


@pytest.fixture(scope="module")
async def short_lease_stack(stack_factory):
    """A second API + worker pair whose service leases last 2 s."""
    s = await stack_factory(SERVICE_AGENT_LEASE_SECONDS=2)
    yield s
    await s.close()


@pytest.fixture
async def short_zone(short_lease_stack, signing_key) -> Zone:
    if short_lease_stack._worker is None:  # a failed test may have left it stopped
        await short_lease_stack.start_worker()
    return await seed_zone(short_lease_stack, signing_key)


# ------------------------------------------------------------------------------------------------
# §13 case 20: service start


async def test_case20_service_session_has_lease_not_ttl(zone: Zone):
    before = await db_now(zone)
    body = await zone.start(lifecycle="service")
    sid = body["agent_session_id"]
    assert body["lifecycle"] == "service" and body["status"] == "active"
    assert body["ttl_seconds"] is None
    assert body["lease_generation"] == 1
    assert near(ts(body["last_heartbeat_at"]), before)
    assert near(ts(body["heartbeat_deadline_at"]), before + 120)
    assert body["delegation_edge_id"] is None and body["parent_id"] is None and body["depth"] == 0

    row = await zone.session_row(sid)
    assert row["ttl_seconds"] is None and row["lease_generation"] == 1
    assert (row["heartbeat_deadline_at"] - row["last_heartbeat_at"]).total_seconds() == 120
    assert await keys_for(zone, LIFECYCLE, sid) == [f"spawn:{sid}"]

    state = await session_state(zone.stack, zone.id, sid)
    assert state["lifecycle"] == "service" and state["status"] == "active"
    assert state["heartbeat_deadline_at"] == body["heartbeat_deadline_at"]

    # a task session, for contrast: TTL, no lease
    task = await zone.start()
    assert task["ttl_seconds"] == 3600 and task["heartbeat_deadline_at"] is None and task["lease_generation"] == 0


# ------------------------------------------------------------------------------------------------
# §13 cases 60-66: heartbeats and service registration


async def test_case60_heartbeat_within_lease(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    await asyncio.sleep(0.05)
    before = await db_now(zone)
    r = await heartbeat(zone, sid)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"agent", "service", "active_invocations"}
    assert body["service"] is None and body["active_invocations"] == 0
    agent = body["agent"]
    assert set(agent) == AGENT_KEYS
    assert agent["id"] == agent["agent_session_id"] == sid
    assert agent["zone_id"] == zone.id and agent["application_id"] == "app-1"
    assert agent["status"] == "active" and agent["lease_generation"] == 1
    assert near(ts(agent["last_heartbeat_at"]), before, 1)
    assert near(ts(agent["heartbeat_deadline_at"]), before + 120, 1)

    row = await zone.session_row(sid)
    assert row["heartbeat_deadline_at"].timestamp() == pytest.approx(ts(agent["heartbeat_deadline_at"]), abs=0.001)
    assert row["last_active_at"].timestamp() == pytest.approx(ts(agent["last_active_at"]), abs=0.001)
    # heartbeats are not session transitions: no event, no state_version bump
    assert await keys_for(zone, LIFECYCLE, sid) == [f"spawn:{sid}"]
    assert row["state_version"] == 1

    # with the current generation, and a body without one: both accepted (no fencing without a generation)
    assert (await heartbeat(zone, sid, lease_generation=1, active_invocations=4)).json()["active_invocations"] == 4
    # body is required and validated
    r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/heartbeat", headers=zone.headers())
    assert error(r) == (400, "invalid_body")
    assert error(await heartbeat(zone, sid, status="sleeping")) == (400, "invalid_body")
    assert error(await heartbeat(zone, sid, active_invocations=-1)) == (400, "invalid_body")


async def test_case61_late_heartbeat_settles_then_refuses(short_zone: Zone):
    """A heartbeat that finds the lease lapsed before the timer settled it: the API settles it in
    its own transaction (subtree suspended, committed) and answers 409 session_lease_expired, with
    no worker running: the answer never waits on Temporal."""
    z, s = short_zone, short_zone.stack
    root = (await z.start(lifecycle="service"))["agent_session_id"]
    child = (await z.start(lifecycle="service", parent_id=root))["agent_session_id"]
    grandchild = (await z.start(parent_id=child))["agent_session_id"]
    # No worker: the lease timers cannot fire.
    await s.stop_worker()
    try:
        deadline = (await z.session_row(root))["heartbeat_deadline_at"].timestamp()
        await asyncio.sleep(max(0.0, deadline - await db_now(z)) + 0.3)
        assert (await z.session_row(root))["status"] == "active"  # lapsed, not settled
        r = await asyncio.wait_for(heartbeat(z, root, lease_generation=1), 5)
        assert error(r) == (409, "session_lease_expired"), r.text
    finally:
        await s.start_worker()

    # committed before the answer: the whole active subtree, reason service_heartbeat_lost
    rows = {sid: await z.session_row(sid) for sid in (root, child, grandchild)}
    assert {sid: row["status"] for sid, row in rows.items()} == dict.fromkeys(rows, "suspended")
    events = await z.events(LIFECYCLE)
    suspends = {e["payload_json"]["agent_session_id"]: e for e in events if e["payload_json"]["event"] == "suspend"}
    assert set(suspends) == {root, child, grandchild}
    for sid, e in suspends.items():
        assert e["dedupe_key"] == f"suspend:{sid}:{rows[sid]['state_version']}"
        assert e["payload_json"]["reason"] == "service_heartbeat_lost"
    assert suspends[child]["payload_json"]["parent_id"] == root
    # the heartbeat did not extend the lapsed lease
    assert rows[root]["heartbeat_deadline_at"].timestamp() == deadline

    for sid in (root, child, grandchild):
        await eventually(lambda sid=sid: _status_is(s, z.id, sid, "suspended"), timeout=5)
    # the root's workflow heard of the settlement (a `suspended` notice in its history)
    history = await s.client.get_workflow_handle(session_workflow_id(z.id, root)).fetch_history()
    assert "suspended" in notices_in(history)
    # a heartbeat now (suspended) is accepted and never resumes
    r = await heartbeat(z, root, lease_generation=1)
    assert r.status_code == 200 and r.json()["agent"]["status"] == "suspended", r.text


async def _status_is(stack: Stack, zone_id: str, sid: str, status: str) -> bool:
    return (await session_state(stack, zone_id, sid))["status"] == status


async def test_case62_heartbeat_refusals(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    # non-owner
    assert error(await heartbeat(zone, sid, headers=zone.headers("app-2"))) == (403, "application_ownership_required")
    # admin or spawn_for may heartbeat another application's session
    assert (await heartbeat(zone, sid, headers=zone.headers("app-2", scopes=["coordinator.admin"]))).status_code == 200
    assert (await heartbeat(zone, sid, headers=zone.headers(
        "app-2", scopes=["coordinator.spawn_for:app-1"]))).status_code == 200
    # the operator token is not a JWT: heartbeat is not an operator route
    assert error(await heartbeat(zone, sid, headers=zone.operator_headers)) == (401, "invalid_token")
    # unknown
    assert error(await heartbeat(zone, "no-such-session")) == (404, "session_not_found")
    # a task session holds no lease (sdk-wire-contract §4.5)
    task = (await zone.start())["agent_session_id"]
    assert error(await heartbeat(zone, task)) == (409, "session_not_service")
    # terminated
    assert (await delete(zone, sid, body={"lease_generation": 1})).status_code == 204
    assert error(await heartbeat(zone, sid)) == (409, "session_not_live")
    assert error(await heartbeat(zone, sid, lease_generation=1)) == (409, "session_not_live")


async def test_case63_foreign_service_id_rolls_back_heartbeat(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    foreign = await register(zone, app="app-2")
    before = await zone.session_row(sid)
    r = await heartbeat(zone, sid, service_id=foreign["id"], status="degraded")
    assert error(r) == (404, "agent_service_not_found")
    after = await zone.session_row(sid)
    for column in ("last_heartbeat_at", "last_active_at", "heartbeat_deadline_at"):
        assert after[column] == before[column], column
    svc = await zone.stack.db.fetchrow("SELECT health FROM agent_services WHERE id = %s", (foreign["id"],))
    assert svc["health"] == "starting"
    assert error(await heartbeat(zone, sid, service_id="ghost")) == (404, "agent_service_not_found")


async def test_case64_heartbeat_updates_own_service(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    svc = await register(zone, metadata={"keep": True, "a": 0})
    r = await heartbeat(zone, sid, service_id=svc["id"], status="degraded", metadata={"a": 1},
                        active_invocations=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active_invocations"] == 3
    assert set(body["service"]) == SERVICE_KEYS
    assert body["service"]["id"] == svc["id"] and body["service"]["health"] == "degraded"
    assert body["service"]["metadata_json"] == {"keep": True, "a": 1}
    assert ts(body["service"]["last_heartbeat_at"]) == ts(body["agent"]["last_heartbeat_at"])
    row = await zone.stack.db.fetchrow("SELECT health, metadata_json FROM agent_services WHERE id = %s", (svc["id"],))
    assert row["health"] == "degraded" and row["metadata_json"] == {"keep": True, "a": 1}


async def test_case65_heartbeat_on_suspended_service_keeps_it_suspended(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"suspended": 1}, r.text
    before = await zone.session_row(sid)
    await asyncio.sleep(0.05)
    r = await heartbeat(zone, sid, lease_generation=1)
    assert r.status_code == 200, r.text
    assert r.json()["agent"]["status"] == "suspended"
    after = await zone.session_row(sid)
    assert after["status"] == "suspended"
    assert after["heartbeat_deadline_at"] > before["heartbeat_deadline_at"]
    assert after["state_version"] == before["state_version"]
    assert (await session_state(zone.stack, zone.id, sid))["status"] == "suspended"
    # resume (case 55 for services): fresh deadline, workflow active again
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"resumed": 1}, r.text
    state = await session_state(zone.stack, zone.id, sid)
    row = await zone.session_row(sid)
    assert state["status"] == "active" and row["status"] == "active"
    assert near(row["heartbeat_deadline_at"].timestamp(), await db_now(zone) + 120)
    assert ts(state["heartbeat_deadline_at"]) == pytest.approx(row["heartbeat_deadline_at"].timestamp(), abs=0.001)


async def test_case66_register_service(zone: Zone):
    url = "https://svc.example/agent"
    first = await register(zone, endpoint=url, protocol_versions=["1"], framework={"name": "fw", "version": "2"},
                           capabilities=["a"], metadata={"m": 1})
    assert set(first) == SERVICE_KEYS
    assert first["health"] == "starting" and first["endpoint_url"] == url
    assert first["framework_name"] == "fw" and first["framework_version"] == "2"
    assert first["protocol_versions"] == ["1"] and first["capabilities"] == ["a"] and first["metadata_json"] == {"m": 1}
    assert first["last_heartbeat_at"] is not None

    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    assert (await heartbeat(zone, sid, service_id=first["id"], status="healthy")).status_code == 200
    second = await register(zone, endpoint=url, capabilities=["b", "c"])
    assert second["id"] == first["id"]
    assert second["capabilities"] == ["b", "c"] and second["health"] == "healthy"
    assert second["framework_name"] is None and second["metadata_json"] == {}

    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers(),
                             json={"application_id": "app-1", "endpoint_url": "nope"})
    assert error(r) == (400, "invalid_body")
    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers("app-2"),
                             json={"application_id": "app-1", "endpoint_url": url})
    assert error(r) == (403, "application_ownership_required")
    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers(
        "app-2", scopes=["coordinator.admin"]), json={"application_id": "app-1", "endpoint_url": url})
    assert error(r) == (403, "application_ownership_required")  # admin is not enough (§14)
    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers(
        "app-2", scopes=["coordinator.spawn_for:ghost-app"]), json={"application_id": "ghost-app", "endpoint_url": url})
    assert error(r) == (404, "application_not_found")

    # §4.12 list (operator may list)
    r = await zone.http.get(f"/zones/{zone.id}/agent-services", headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    assert [i["id"] for i in r.json()["items"]] == [first["id"]] and r.json()["next_cursor"] is None


# ------------------------------------------------------------------------------------------------
# lease takeover and fencing (sdk-wire-contract §4.5, §9)


async def test_takeover_fences_the_old_holder(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    assert (await heartbeat(zone, sid, lease_generation=1)).status_code == 200

    before = await db_now(zone)
    r = await take_lease(zone, sid)
    assert r.status_code == 200, r.text
    taken = r.json()
    assert set(taken) == {"agent_session_id", "status", "heartbeat_deadline_at", "lease_generation"}
    assert taken["agent_session_id"] == sid and taken["status"] == "active" and taken["lease_generation"] == 2
    assert near(ts(taken["heartbeat_deadline_at"]), before + 120)
    assert (await zone.session_row(sid))["lease_generation"] == 2

    # the old holder (generation 1) is fenced on heartbeat and on DELETE
    assert error(await heartbeat(zone, sid, lease_generation=1)) == (409, "session_lease_fenced")
    assert error(await delete(zone, sid, body={"lease_generation": 1})) == (409, "session_lease_fenced")
    assert (await zone.session_row(sid))["status"] == "active"
    # the owner must say which generation it holds
    r = await delete(zone, sid)
    assert error(r) == (400, "lease_generation_required")
    assert (await zone.session_row(sid))["status"] == "active"
    # the new holder
    r = await heartbeat(zone, sid, lease_generation=2)
    assert r.status_code == 200 and r.json()["agent"]["lease_generation"] == 2
    assert (await delete(zone, sid, body={"lease_generation": 2})).status_code == 204
    row = await zone.session_row(sid)
    assert row["status"] == "terminated" and row["termination_reason"] == "requested"
    assert f"terminate:{sid}" in await keys_for(zone, LIFECYCLE, sid)
    handle = zone.stack.client.get_workflow_handle(session_workflow_id(zone.id, sid))
    assert await eventually(lambda: _completed(handle))
    # the takeover is a notice in the session's history; the refused DELETEs wrote nothing
    history = await handle.fetch_history()
    assert notices_in(history) == ["created", "lease_taken", "terminated"]

    # lease refusals
    assert error(await take_lease(zone, sid)) == (409, "session_not_live")
    assert error(await take_lease(zone, "ghost")) == (404, "session_not_found")
    task = (await zone.start())["agent_session_id"]
    assert error(await take_lease(zone, task)) == (409, "session_not_service")
    other = (await zone.start(lifecycle="service"))["agent_session_id"]
    assert error(await take_lease(zone, other, headers=zone.headers("app-2"))) == (
        403, "application_ownership_required")

    # an admin-scoped caller may DELETE without a generation; so may the operator
    r = await delete(zone, other, headers=zone.headers("app-2", scopes=["coordinator.admin"]))
    assert r.status_code == 204, r.text
    third = (await zone.start(lifecycle="service"))["agent_session_id"]
    assert (await delete(zone, third, headers=zone.operator_headers)).status_code == 204
    # a task session needs no generation
    assert (await delete(zone, task)).status_code == 204


async def _completed(handle) -> bool:
    try:
        return (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False  # not started yet: the dispatcher delivers after the commit
        raise


async def test_takeover_of_suspended_session_keeps_it_suspended(zone: Zone):
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers())).status_code == 200
    r = await take_lease(zone, sid)
    assert r.status_code == 200 and r.json()["status"] == "suspended" and r.json()["lease_generation"] == 2
    assert error(await heartbeat(zone, sid, lease_generation=1)) == (409, "session_lease_fenced")
    assert (await session_state(zone.stack, zone.id, sid))["status"] == "suspended"


# ------------------------------------------------------------------------------------------------
# lease loss by the durable timer


async def test_lease_loss_suspends_subtree_within_two_seconds(short_zone: Zone):
    z, s = short_zone, short_zone.stack
    root = (await z.start(lifecycle="service"))["agent_session_id"]
    child = (await z.start(lifecycle="service", parent_id=root))["agent_session_id"]
    deadline = (await z.session_row(root))["heartbeat_deadline_at"].timestamp()

    # Keep the child's own lease alive: it is suspended only because its parent lost its lease.
    stop = asyncio.Event()

    async def keep_child_alive():
        while not stop.is_set():
            r = await heartbeat(z, child, lease_generation=1)
            assert r.status_code == 200, r.text
            if r.json()["agent"]["status"] != "active":
                return
            await asyncio.sleep(0.3)

    beats = asyncio.create_task(keep_child_alive())
    try:
        async def root_suspended():
            return (await z.session_row(root))["status"] == "suspended"
        await eventually(root_suspended, timeout=max(0.5, deadline - time.time()) + 2.5, interval=0.05)
    finally:
        stop.set()
        await beats

    rows = {sid: await z.session_row(sid) for sid in (root, child)}
    assert rows[root]["status"] == rows[child]["status"] == "suspended"
    settled = rows[root]["updated_at"].timestamp()
    assert deadline <= settled <= deadline + 2.0, settled - deadline
    assert rows[child]["heartbeat_deadline_at"].timestamp() > settled  # the child's lease was alive

    for sid in (root, child):
        assert await keys_for(z, LIFECYCLE, f"suspend:{sid}") == [f"suspend:{sid}:{rows[sid]['state_version']}"]
        (event,) = await events_for(z, LIFECYCLE, f"suspend:{sid}")
        assert event["payload_json"] == {"event": "suspend", "zone_id": z.id, "agent_session_id": sid,
                                         "parent_id": None if sid == root else root,
                                         "reason": "service_heartbeat_lost"}
        (revoke,) = await events_for(z, REVOKE, f"agent_suspend:{sid}")
        assert revoke["payload_json"]["reason"] == "service_heartbeat_lost"
        assert revoke["payload_json"]["session_id"] == "ar-1"

    # both workflows (hosted by the factory stack's worker) report suspended
    for sid in (root, child):
        await eventually(lambda sid=sid: _status_is(s, z.id, sid, "suspended"), timeout=3)
    # the root's history shows the lease timer firing and the settlement activity
    history = await s.client.get_workflow_handle(session_workflow_id(z.id, root)).fetch_history()
    types = [e.event_type for e in history.events]
    assert EventType.EVENT_TYPE_TIMER_FIRED in types
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED in types


# ------------------------------------------------------------------------------------------------
# a long-lived service session: many heartbeats, then continue-as-new


@pytest.fixture
async def unlimited_zone(stack_factory, signing_key):
    """A zone on its own stack without the global per-ip limit (600/min): a 2,000-heartbeat burst
    from one address would otherwise be refused, and would drain the shared stack's bucket."""
    s = await stack_factory(COORDINATOR_RATE_LIMIT_PER_MIN=0)
    try:
        yield await seed_zone(s, signing_key)
    finally:
        await s.close()


async def test_service_session_survives_heartbeats_and_continues_as_new(unlimited_zone: Zone):
    zone = unlimited_zone
    sid = (await zone.start(lifecycle="service"))["agent_session_id"]
    handle = zone.stack.client.get_workflow_handle(session_workflow_id(zone.id, sid))
    await session_state(zone.stack, zone.id, sid)  # its workflow is running
    events_before = (await handle.describe()).history_length
    headers = zone.headers()
    url = f"/zones/{zone.id}/agents/{sid}/heartbeat"
    statuses: list[int] = []
    todo = iter(range(2000))

    async def beater():
        for _ in todo:
            r = await zone.http.post(url, json={"lease_generation": 1, "status": "healthy"}, headers=headers)
            statuses.append(r.status_code)

    started = time.monotonic()
    await asyncio.gather(*(beater() for _ in range(20)))
    elapsed = time.monotonic() - started
    assert len(statuses) == 2000 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    # No wall-clock bound: API, client and worker share this process's one thread (~8 ms of CPU per
    # heartbeat), so the duration mostly measures the machine's load. What matters is below.
    print(f"2000 heartbeats in {elapsed:.1f} s")
    row = await zone.session_row(sid)
    assert row["status"] == "active" and row["state_version"] == 1
    assert (await session_state(zone.stack, zone.id, sid))["status"] == "active"
    # heartbeats are not workflow events
    assert (await handle.describe()).history_length - events_before < 5

    # grow the history with real transitions until the server suggests continue-as-new (each its
    # own signal: a workflow signalled within DISPATCH_LINGER_MS gets its next notices together)
    linger = zone.stack.settings.DISPATCH_LINGER_MS / 1000 + 0.02
    for i in range(25):
        r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=headers)
        assert r.status_code == 200 and r.json() == {"suspended": 1}, (i, r.text)
        await asyncio.sleep(linger)
        r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=headers)
        assert r.status_code == 200 and r.json() == {"resumed": 1}, (i, r.text)
        await asyncio.sleep(linger)

    async def runs():
        return [w async for w in zone.stack.client.list_workflows(f'WorkflowId = "{handle.id}"')]
    chain = await eventually(lambda: _has_continued(runs), timeout=10)
    assert sum(w.status == WorkflowExecutionStatus.RUNNING for w in chain) == 1
    state = await session_state(zone.stack, zone.id, sid)
    assert state["status"] == "active"
    assert (await handle.query("current_state"))["runs"] >= 2
    desc = await handle.describe()
    assert desc.status == WorkflowExecutionStatus.RUNNING
    history = await handle.fetch_history()
    assert len(history.events) == desc.history_length < 200
    assert history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id

    # per-transition outbox keys: every one of the 25 cycles emitted its events
    keys = await keys_for(zone, LIFECYCLE, sid)
    assert len([k for k in keys if k.startswith("suspend:")]) == 25
    assert len([k for k in keys if k.startswith("resume:")]) == 25

    # still answers correctly after continue-as-new
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=headers)
    assert error(r) == (409, "session_not_found_or_not_suspended")
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=headers)
    assert r.status_code == 200 and r.json() == {"suspended": 1}
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=headers)
    assert error(r) == (409, "session_not_found_or_not_active")
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=headers)
    assert r.status_code == 200 and r.json() == {"resumed": 1}
    assert (await heartbeat(zone, sid, lease_generation=1)).status_code == 200
    assert (await delete(zone, sid, body={"lease_generation": 1})).status_code == 204
    await eventually(lambda: _completed(handle), timeout=5)


async def _has_continued(runs) -> list | None:
    chain = await runs()
    return chain if any(w.status == WorkflowExecutionStatus.CONTINUED_AS_NEW for w in chain) else None


# ------------------------------------------------------------------------------------------------
# §13 cases 67-76: invocations


async def test_case67_create_invocation(zone: Zone):
    svc = await register(zone)
    r = await create_invocation(zone, svc["id"], key="idem-1")
    assert r.status_code == 201, r.text
    assert "idempotency-replayed" not in r.headers
    inv = r.json()
    assert set(inv) == INVOCATION_KEYS
    assert inv["status"] == "pending" and inv["attempts"] == 0 and inv["max_attempts"] == 3
    assert inv["timeout_ms"] == 30000 and inv["retry_policy_json"] == {"max_attempts": 3, "backoff_ms": 1000}
    assert inv["service_id"] == svc["id"] and inv["method"] == "run" and inv["zone_id"] == zone.id
    assert inv["source_session_id"] is None and inv["target_session_id"] is None
    assert inv["deadline_at"] is None and inv["started_at"] is None and inv["completed_at"] is None

    (event,) = await events_for(zone, INVOCATIONS, inv["id"])
    assert event["dedupe_key"] == f"invocation.created:{inv['id']}"
    assert event["payload_json"] == {"event": "invocation.created", "zone_id": zone.id, "service_id": svc["id"],
                                     "invocation_id": inv["id"]}
    receipt = await zone.stack.db.fetchrow(
        "SELECT * FROM coordinator_idempotency_receipts WHERE zone_id = %s AND operation = 'invocation.create.v2'",
        (zone.id,))
    digest = bytes(receipt["key_digest"])
    assert len(digest) == 32 and b"idem-1" not in digest
    assert digest == key_digest("idem-1", zone.stack.settings.idempotency_key_bytes)
    assert receipt["scope_id"] == "app-1" and receipt["resource_type"] == "agent_invocation"
    assert receipt["resource_id"] == inv["id"] and receipt["response_status"] == 201
    assert receipt["response_json"] == inv
    row = await invocation_row(zone, inv["id"])
    assert row["params_json"] == {} and row["metadata_json"] == {} and row["error_json"] is None

    assert await get_invocation(zone, inv["id"]) == inv
    r = await zone.http.get(f"/zones/{zone.id}/invocations/ghost", headers=zone.headers())
    assert error(r) == (404, "invocation_not_found")
    # the invocation's workflow is waiting for a start
    wf = await zone.workflow_state(invocation_workflow_id(zone.id, inv["id"]))
    assert wf["status"] == "pending" and wf["max_attempts"] == 3


async def test_case68_create_validation(zone: Zone):
    svc = await register(zone)
    r = await zone.http.post(f"/zones/{zone.id}/invocations", headers=zone.headers(),
                             json={"service_id": svc["id"], "method": "run"})
    assert error(r) == (400, "invalid_body")
    assert ["idempotency_key"] in [i["path"] for i in r.json()["details"]["issues"]]
    assert error(await create_invocation(zone, "ghost-service")) == (404, "agent_service_not_found")
    r = await create_invocation(zone, svc["id"], key=" key")
    assert error(r) == (400, "idempotency_key_invalid") and r.json()["request_id"]
    assert error(await create_invocation(zone, svc["id"], timeout_ms=0)) == (400, "invalid_body")
    assert error(await create_invocation(zone, svc["id"], retry_policy={"max_attempts": 11})) == (400, "invalid_body")
    assert await zone.stack.db.fetchrow("SELECT count(*) AS n FROM agent_invocations WHERE zone_id = %s",
                                        (zone.id,)) == {"n": 0}


async def test_case69_replay_and_conflict(zone: Zone):
    svc = await register(zone)
    task = (await zone.start())["agent_session_id"]
    body = {"source_session_id": task, "params": {"x": 1}, "metadata": {"m": "v"}, "timeout_ms": 5000,
            "retry_policy": {"max_attempts": 2, "backoff_ms": 10}}
    first = await create_invocation(zone, svc["id"], key="idem-replay", **body)
    assert first.status_code == 201, first.text
    again = await create_invocation(zone, svc["id"], key="idem-replay", **body)
    assert again.status_code == 201 and again.headers["idempotency-replayed"] == "true"
    assert again.json() == first.json()
    assert len(await events_for(zone, INVOCATIONS, first.json()["id"])) == 1
    n = await zone.stack.db.fetchrow("SELECT count(*) AS n FROM agent_invocations WHERE zone_id = %s", (zone.id,))
    assert n["n"] == 1
    changed = await create_invocation(zone, svc["id"], key="idem-replay", **{**body, "params": {"x": 2}})
    assert error(changed) == (409, "idempotency_key_conflict")
    # the same key from another principal (with invoke_from) conflicts too
    other = await create_invocation(zone, svc["id"], key="idem-replay", headers=zone.headers(
        "app-2", scopes=["coordinator.invoke_from:app-1"]), **body)
    assert error(other) == (409, "idempotency_key_conflict")


async def test_case70_endpoint_sessions_must_be_invocation_live(zone: Zone, signing_key):
    svc = await register(zone)
    other_zone = await seed_zone(zone.stack, signing_key)
    foreign = (await other_zone.start())["agent_session_id"]
    service_session = (await zone.start(lifecycle="service"))["agent_session_id"]
    suspended = (await zone.start())["agent_session_id"]
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{suspended}/suspend",
                                  headers=zone.headers())).status_code == 200
    for sid in (foreign, service_session, suspended, "ghost"):
        assert error(await create_invocation(zone, svc["id"], source_session_id=sid)) == (404, "session_not_found")
        assert error(await create_invocation(zone, svc["id"], target_session_id=sid)) == (404, "session_not_found")
    # a service session that carries a ttl is invocation-live
    with_ttl = (await zone.start(lifecycle="service", ttl_seconds=600))["agent_session_id"]
    r = await create_invocation(zone, svc["id"], source_session_id=with_ttl)
    assert r.status_code == 201 and r.json()["source_session_id"] == with_ttl, r.text


async def test_case71_invoker_ownership(zone: Zone):
    svc = await register(zone)  # service of app-1
    r = await create_invocation(zone, svc["id"], headers=zone.headers("app-2"))
    assert error(r) == (403, "invoker_ownership_required")
    r = await create_invocation(zone, svc["id"],
                                headers=zone.headers("app-2", scopes=["coordinator.invoke_from:app-2"]))
    assert error(r) == (403, "invoker_ownership_required")
    r = await create_invocation(zone, svc["id"],
                                headers=zone.headers("app-2", scopes=["coordinator.invoke_from:app-1"]))
    assert r.status_code == 201, r.text
    r = await create_invocation(zone, svc["id"], headers=zone.headers("app-2", scopes=["coordinator.admin"]))
    assert r.status_code == 201, r.text
    inv = r.json()["id"]
    # the source session decides S: app-2 invoking from its own session is allowed ...
    source = (await zone.start("app-2"))["agent_session_id"]
    r = await create_invocation(zone, svc["id"], headers=zone.headers("app-2"), source_session_id=source)
    assert r.status_code == 201, r.text
    # ... but start/cancel/complete are authorised against the service's application
    for action, body in (("start", None), ("cancel", None), ("complete", {"status": "succeeded"})):
        assert error(await patch(zone, r.json()["id"], action, body, headers=zone.headers("app-2"))) == \
            (403, "invoker_ownership_required")
    assert (await patch(zone, inv, "start", headers=zone.headers(
        "app-2", scopes=["coordinator.invoke_from:app-1"]))).status_code == 200
    assert error(await patch(zone, "ghost", "start")) == (404, "invocation_not_found")


async def test_case72_start_and_retry_attempts(zone: Zone):
    svc = await register(zone)
    inv = (await new_invocation(zone, svc["id"]))["id"]
    r = await patch(zone, inv, "start")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == INVOCATION_KEYS
    assert body["status"] == "running" and body["attempts"] == 1 and body["completed_at"] is None
    assert near(ts(body["started_at"]), await db_now(zone))
    assert ts(body["deadline_at"]) - ts(body["started_at"]) == pytest.approx(30.0, abs=0.002)
    assert error(await patch(zone, inv, "start")) == (409, "invocation_not_startable")
    for attempt in (1, 2):
        r = await patch(zone, inv, "complete", {"status": "failed", "error": {"attempt": attempt}})
        assert r.status_code == 200 and r.json()["status"] == "failed", r.text
        r = await patch(zone, inv, "start")
        assert r.status_code == 200 and r.json()["attempts"] == attempt + 1, r.text
        assert (await invocation_row(zone, inv))["error_json"] is None  # cleared by start
    r = await patch(zone, inv, "complete", {"status": "failed"})
    assert r.status_code == 200 and r.json()["attempts"] == 3 and r.json()["max_attempts"] == 3
    assert error(await patch(zone, inv, "start")) == (409, "invocation_not_startable")
    assert await keys_for(zone, INVOCATIONS, inv) == [
        f"invocation.created:{inv}",
        f"invocation.started:{inv}:1", f"invocation.failed:{inv}:1",
        f"invocation.started:{inv}:2", f"invocation.failed:{inv}:2",
        f"invocation.started:{inv}:3", f"invocation.failed:{inv}:3"]
    assert await eventually(lambda: _completed(zone.stack.client.get_workflow_handle(
        invocation_workflow_id(zone.id, inv))))


async def test_case73_cancel(zone: Zone):
    svc = await register(zone)
    pending = (await new_invocation(zone, svc["id"]))["id"]
    r = await patch(zone, pending, "cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["cancel_requested_at"], r.text
    assert f"invocation.cancel_requested:{pending}" in await keys_for(zone, INVOCATIONS, pending)
    assert error(await patch(zone, pending, "cancel")) == (409, "invocation_not_cancelable")
    assert error(await patch(zone, pending, "start")) == (409, "invocation_not_startable")
    await eventually(lambda: _completed(zone.stack.client.get_workflow_handle(
        invocation_workflow_id(zone.id, pending))))

    # running → cancel_requested (never swept by the deadline) → complete
    running = (await new_invocation(zone, svc["id"], timeout_ms=300))["id"]
    assert (await patch(zone, running, "start")).status_code == 200
    r = await patch(zone, running, "cancel", {"reason": "user asked"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancel_requested" and r.json()["cancel_requested_at"]
    row = await invocation_row(zone, running)
    assert row["metadata_json"] == {"cancel_reason": "user asked"}
    r = await patch(zone, running, "cancel")  # again: stays cancel_requested
    assert r.status_code == 200 and r.json()["status"] == "cancel_requested"
    await asyncio.sleep(1.0)  # well past the 300 ms deadline
    assert (await get_invocation(zone, running))["status"] == "cancel_requested"
    r = await patch(zone, running, "complete", {"status": "succeeded", "metadata": {"done": True}})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert (await invocation_row(zone, running))["metadata_json"] == {"cancel_reason": "user asked", "done": True}
    assert error(await patch(zone, running, "cancel")) == (409, "invocation_not_cancelable")

    # failed (attempts remain, workflow still running) cannot be canceled
    failed = (await new_invocation(zone, svc["id"]))["id"]
    assert (await patch(zone, failed, "start")).status_code == 200
    assert (await patch(zone, failed, "complete", {"status": "failed"})).status_code == 200
    assert error(await patch(zone, failed, "cancel")) == (409, "invocation_not_cancelable")
    assert error(await patch(zone, running, "cancel", {"reason": ""})) == (400, "invalid_body")


async def test_case74_complete(zone: Zone):
    svc = await register(zone)
    inv = (await new_invocation(zone, svc["id"]))["id"]
    assert error(await patch(zone, inv, "complete", {"status": "succeeded"})) == (409, "invocation_not_completable")
    assert (await patch(zone, inv, "start")).status_code == 200
    assert error(await patch(zone, inv, "complete", {"status": "bogus"})) == (400, "invalid_body")
    assert error(await patch(zone, inv, "complete", {})) == (400, "invalid_body")
    r = await patch(zone, inv, "complete", {"status": "failed", "error": {"code": "x"}, "metadata": {"k": 1}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "failed" and body["completed_at"] and "error" not in body and "error_json" not in body
    row = await invocation_row(zone, inv)
    assert row["error_json"] == {"code": "x"} and row["metadata_json"] == {"k": 1}
    assert row["deadline_at"] is not None  # left as it was
    (failed,) = await events_for(zone, INVOCATIONS, f"invocation.failed:{inv}")
    assert failed["dedupe_key"] == f"invocation.failed:{inv}:1"
    assert failed["payload_json"] == {"event": "invocation.failed", "zone_id": zone.id, "service_id": svc["id"],
                                      "invocation_id": inv}
    assert error(await patch(zone, inv, "complete", {"status": "succeeded"})) == (409, "invocation_not_completable")

    ok = (await new_invocation(zone, svc["id"]))["id"]
    assert (await patch(zone, ok, "start")).status_code == 200
    assert (await patch(zone, ok, "complete", {"status": "succeeded"})).json()["status"] == "succeeded"
    assert f"invocation.succeeded:{ok}" in await keys_for(zone, INVOCATIONS, ok)
    handle = zone.stack.client.get_workflow_handle(invocation_workflow_id(zone.id, ok))
    await eventually(lambda: _completed(handle))
    assert await handle.result() == "succeeded"
    assert error(await patch(zone, ok, "complete", {"status": "failed"})) == (409, "invocation_not_completable")
    assert error(await patch(zone, ok, "start")) == (409, "invocation_not_startable")

    # list filters (§4.16)
    r = await zone.http.get(f"/zones/{zone.id}/invocations?status=succeeded", headers=zone.operator_headers)
    assert [i["id"] for i in r.json()["items"]] == [ok]
    assert "retry_policy_json" not in r.json()["items"][0]
    r = await zone.http.get(f"/zones/{zone.id}/invocations?service_id={svc['id']}&limit=1", headers=zone.headers())
    assert len(r.json()["items"]) == 1 and r.json()["next_cursor"] == ok
    r = await zone.http.get(f"/zones/{zone.id}/invocations?status=bogus", headers=zone.headers())
    assert error(r) == (400, "invalid_query")


async def test_case75_invocation_rate_limit(stack_factory, signing_key):
    s = await stack_factory(INVOCATION_RATE_LIMIT_PER_MIN=2)
    try:
        zone = await seed_zone(s, signing_key)
        svc = await register(zone)
        # stay inside one fixed minute window
        if time.time() % 60 > 50:
            await asyncio.sleep(60.5 - time.time() % 60)
        first = await create_invocation(zone, svc["id"], key="rl-1")  # 1
        assert first.status_code == 201, first.text
        inv = first.json()["id"]
        assert (await patch(zone, inv, "start")).status_code == 200  # 2
        before = await invocation_row(zone, inv)
        for action, body in (("complete", {"status": "succeeded"}), ("cancel", None), ("start", None)):
            assert error(await patch(zone, inv, action, body)) == (429, "rate_limited"), action
        # refused before any body parsing or database work
        assert error(await patch(zone, inv, "complete", {"status": "bogus"})) == (429, "rate_limited")
        assert error(await patch(zone, "ghost", "start")) == (429, "rate_limited")
        assert await invocation_row(zone, inv) == before
        # a new create is limited after the replay check ...
        assert error(await create_invocation(zone, svc["id"], key="rl-2")) == (429, "rate_limited")
        assert (await zone.stack.db.fetchrow("SELECT count(*) AS n FROM agent_invocations WHERE zone_id = %s",
                                             (zone.id,)))["n"] == 1
        # ... so a replay is still answered (§13 case 69)
        replay = await create_invocation(zone, svc["id"], key="rl-1")
        assert replay.status_code == 201 and replay.headers["idempotency-replayed"] == "true"
        assert replay.json() == first.json()
        # the counter is per client: another application is not limited
        r = await patch(zone, inv, "complete", {"status": "succeeded"},
                        headers=zone.headers("app-2", scopes=["coordinator.invoke_from:app-1"]))
        assert r.status_code == 200, r.text
    finally:
        await s.close()


async def test_case76_deadline_fails_then_times_out(zone: Zone):
    """Durable deadline timers: each attempt settles within 2 s of deadline_at (timeout 1000 ms)."""
    svc = await register(zone)
    inv = (await new_invocation(zone, svc["id"], timeout_ms=1000))["id"]
    handle = zone.stack.client.get_workflow_handle(invocation_workflow_id(zone.id, inv))
    for attempt in (1, 2, 3):
        r = await patch(zone, inv, "start")
        assert r.status_code == 200 and r.json()["attempts"] == attempt, r.text
        deadline = ts(r.json()["deadline_at"])
        expected = "failed" if attempt < 3 else "timed_out"

        async def settled():
            row = await invocation_row(zone, inv)
            return row if row["status"] != "running" else None
        row = await eventually(settled, timeout=deadline - time.time() + 2.0, interval=0.05)
        assert row["status"] == expected and row["attempts"] == attempt
        assert row["error_json"] == {"reason": "deadline_exceeded"}
        assert deadline <= row["completed_at"].timestamp() <= deadline + 2.0
        key = f"invocation.failed:{inv}:{attempt}" if attempt < 3 else f"invocation.timed_out:{inv}"
        (event,) = [e for e in await zone.events(INVOCATIONS) if e["dedupe_key"] == key]
        assert event["payload_json"]["event"] == f"invocation.{expected}"
    assert error(await patch(zone, inv, "start")) == (409, "invocation_not_startable")
    assert await keys_for(zone, INVOCATIONS, inv) == [
        f"invocation.created:{inv}",
        f"invocation.started:{inv}:1", f"invocation.failed:{inv}:1",
        f"invocation.started:{inv}:2", f"invocation.failed:{inv}:2",
        f"invocation.started:{inv}:3", f"invocation.timed_out:{inv}"]
    await eventually(lambda: _completed(handle), timeout=3)
    assert await handle.result() == "timed_out"
    history = await handle.fetch_history()
    assert sum(e.event_type == EventType.EVENT_TYPE_TIMER_FIRED for e in history.events) == 3


# ------------------------------------------------------------------------------------------------
# the published client (caracalai-sdk 1.0.0) over real HTTP


def _python312() -> str | None:
    found = shutil.which("python3.12")
    candidates = ([found] if found else []) + sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12")) + \
        sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for candidate in candidates:
        try:
            if subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                              capture_output=True, timeout=30).returncode == 0:
                return candidate
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _sdk_python() -> str:
    """The interpreter of a cached venv (.data/sdk-venv) holding caracalai-sdk 1.0.0; skips if none."""
    venv = ROOT / ".data" / "sdk-venv"
    python = venv / "bin" / "python"
    check = [str(python), "-c", ("import caracalai, importlib.metadata as m; "
                                 "assert m.version('caracalai-sdk') == '1.0.0'")]
    if python.exists() and subprocess.run(check, capture_output=True, timeout=60).returncode == 0:
        return str(python)
    interpreter = _python312()
    if interpreter is None:
        pytest.skip("no Python 3.12 interpreter found (caracalai-sdk 1.0.0 requires Python >= 3.12)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "caracalai-sdk==1.0.0"], check=True,
                       capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"could not install caracalai-sdk==1.0.0 into a Python 3.12 venv: {exc} "
                    f"{detail.decode(errors='replace')[-500:]}")
    if subprocess.run(check, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("caracalai-sdk==1.0.0 installed but not importable")
    return str(python)


async def test_published_sdk_service_lease_flow(zone: Zone):
    import uvicorn

    from api.app import create_app
    from devstack.postgres import free_port

    python = await asyncio.to_thread(_sdk_python)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(services=zone.stack.services), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), timeout=10)
        assert not serving.done(), "uvicorn did not start"
        token = zone.token("app-1", "ar-1", ttl_seconds=3600)
        proc = await asyncio.create_subprocess_exec(
            python, str(ROOT / "tests" / "sdk_clients" / "service_lease_flow.py"),
            f"http://127.0.0.1:{port}", zone.id, "app-1", token,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("CARACAL_")})
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)

    out = json.loads(stdout.decode().strip().splitlines()[-1])
    sid = out["session_id"]
    assert out["start"]["lease_generation"] == 1 and out["start"]["heartbeat_deadline_at"]
    assert out["heartbeat"] == {"status": "active", "lease_generation": 1,
                                "heartbeat_deadline_at": out["heartbeat"]["heartbeat_deadline_at"]}
    assert ts(out["heartbeat"]["heartbeat_deadline_at"]) >= ts(out["start"]["heartbeat_deadline_at"])
    assert out["attach"]["lease_generation"] == 2 and out["attach"]["status"] == "active"
    assert out["stale_heartbeat"] == {"status": 409, "code": "session_lease_fenced"}
    assert out["status_after_stale_close"] == "active"
    assert out["new_holder_heartbeat"] == {"status": "active", "lease_generation": 2}
    assert out["status_after_close"] == "terminated"

    row = await zone.session_row(sid)
    assert row["lifecycle"] == "service" and row["status"] == "terminated" and row["lease_generation"] == 2
    assert row["labels"] == ["sdk"] and row["metadata_json"] == {"task": "sdk-probe"}
    assert await keys_for(zone, LIFECYCLE, sid) == [f"spawn:{sid}", f"terminate:{sid}"]
    # the SDK generated the start's idempotency key: a receipt with the shorter retention
    receipt = await zone.stack.db.fetchrow(
        "SELECT expires_at - created_at AS kept FROM coordinator_idempotency_receipts WHERE resource_id = %s", (sid,))
    assert receipt["kept"].total_seconds() == zone.stack.settings.GENERATED_IDEMPOTENCY_RETENTION_SECONDS
