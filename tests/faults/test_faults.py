"""Crashes and outages against real processes (issue: operating on Temporal, §3)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from tests.faults.conftest import OPERATOR_TOKEN, FaultStack
from workflows.models import invocation_workflow_id, session_workflow_id

pytestmark = pytest.mark.faults


async def _request(http: httpx.AsyncClient, method: str, url: str, **kw) -> httpx.Response:
    """One HTTP call; a dropped connection counts as a 503 the client would retry."""
    try:
        return await http.request(method, url, timeout=30, **kw)
    except httpx.TransportError:
        return httpx.Response(503, json={"error": "connection_lost"})


async def _retry(http: httpx.AsyncClient, method: str, url: str, headers: dict[str, str]) -> int:
    for _ in range(40):
        r = await _request(http, method, url, headers=headers)
        if r.status_code != 503:
            return r.status_code
        await asyncio.sleep(0.5)
    return r.status_code


async def test_worker_and_dispatcher_killed_mid_load_lose_nothing_and_apply_nothing_twice(fault_stack: FaultStack):
    """kill -9 the worker and the dispatcher while 500 sessions are created, suspended and
    terminated concurrently: no request fails, every workflow converges on its row."""
    s = fault_stack
    base = f"{s.base_url}/zones/{s.zone}/agents"
    results: dict[int, dict[str, int]] = {}
    ids: dict[int, str] = {}

    async def lifecycle(http: httpx.AsyncClient, n: int) -> None:
        h = s.headers()
        outcome = results.setdefault(n, {})
        # Create with an Idempotency-Key, retried on 503: one session per key, whatever happens.
        for _ in range(20):
            r = await _request(http, "POST", base, json={"application_id": "app-1"},
                               headers={**h, "Idempotency-Key": f"load-{n}"})
            if r.status_code != 503:
                break
            await asyncio.sleep(0.5)
        outcome["create"] = r.status_code
        if r.status_code != 201:
            return
        sid = ids[n] = r.json()["agent_session_id"]
        # Commands are retried on 503 like a real client; an answer lost in the outage may have
        # been applied, so the retry then sees the new state (409 / 404), never a second effect.
        outcome["suspend"] = await _retry(http, "PATCH", f"{base}/{sid}/suspend", h)
        outcome["delete"] = await _retry(http, "DELETE", f"{base}/{sid}", h)

    async def killer() -> None:
        await asyncio.sleep(4)
        s.kill_worker()
        s.kill_dispatcher()
        await asyncio.sleep(3)
        s.start_worker()
        s.start_dispatcher()

    sem = asyncio.Semaphore(16)

    async def bounded(http, n):
        async with sem:
            await lifecycle(http, n)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as http:
        await asyncio.gather(killer(), *(bounded(http, n) for n in range(500)))

    statuses = Counter(v for o in results.values() for v in o.values())
    # Commands never wait on Temporal: killing the worker and the dispatcher fails no request.
    assert set(statuses) <= {200, 201, 204}, statuses
    assert all(o["create"] == 201 for o in results.values()), Counter(o["create"] for o in results.values())
    # Exactly one session per idempotency key.
    assert await s.db.fetchval("SELECT count(*) FROM sessions WHERE zone_id = %s", (s.zone,)) == 500

    client = await Client.connect(s.temporal.address)
    rows = {r["id"]: r for r in await s.db.fetch("SELECT id, status FROM sessions WHERE zone_id = %s", (s.zone,))}
    events = Counter(e["dedupe_key"].split(":")[0] + ":" + e["dedupe_key"].split(":")[1]
                     for e in await s.db.fetch("SELECT dedupe_key FROM caracal_outbox WHERE zone_id = %s", (s.zone,)))
    unsettled = []
    for n, outcome in results.items():
        sid = ids[n]
        assert outcome["suspend"] == 200 and outcome["delete"] == 204, outcome
        assert rows[sid]["status"] == "terminated", (n, outcome, rows[sid])
        # Never applied twice: at most one event of each kind per session.
        for kind in ("spawn", "suspend", "terminate"):
            assert events[f"{kind}:{sid}"] <= 1, (kind, sid)
        assert events[f"spawn:{sid}"] == 1
        unsettled.append(client.get_workflow_handle(session_workflow_id(s.zone, sid)))
    # Every terminated session's workflow completes once the worker and the dispatcher are back,
    # having applied each transition once (redelivered notices are no-ops).
    await _converged(s, client, unsettled, {r: "terminated" for r in rows},
                     expected_upserts=["suspended", "terminated"])


async def _outbox_drained(s: FaultStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await s.db.fetchval("SELECT count(*) FROM workflow_outbox"):
        assert time.monotonic() < deadline, s.tail()
        await asyncio.sleep(0.5)


async def _converged(s: FaultStack, client: Client, handles, final: dict[str, str],
                     expected_upserts: list[str] | None = None, timeout: float = 120) -> None:
    """Each workflow completed with its row's final status; each status change recorded once."""
    await _outbox_drained(s, timeout)
    deadline = time.monotonic() + timeout
    sem = asyncio.Semaphore(16)

    async def check(handle) -> None:
        async with sem:
            while (await handle.describe()).status.name != "COMPLETED":
                assert time.monotonic() < deadline, f"{handle.id} not completed"
                await asyncio.sleep(0.2)
            assert await handle.result() == final[handle.id.rsplit("/", 1)[1]], handle.id
            if expected_upserts is not None:
                history = await handle.fetch_history()
                # The status attribute as it was upserted, in order. Notices that arrive together
                # (several in one task, or in the start's input) record only the status they end
                # at, so the upserts are the expected ones in order, each at most once, ending at
                # the final status.
                upserts = [json.loads(field.data)
                           for e in history.events
                           if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
                           for field in e.upsert_workflow_search_attributes_event_attributes
                           .search_attributes.indexed_fields.values()]
                remaining = iter(expected_upserts)
                assert all(status in remaining for status in upserts), (handle.id, upserts)
                assert upserts and upserts[-1] == expected_upserts[-1], (handle.id, upserts)
    await asyncio.gather(*(check(h) for h in handles))


async def test_postgres_outage_answers_503_and_recovers(fault_stack: FaultStack):
    s = fault_stack
    base = f"{s.base_url}/zones/{s.zone}/agents"
    async with httpx.AsyncClient() as http:
        h = s.headers()
        before = (await _request(http, "POST", base, json={"application_id": "app-1"}, headers=h)).json()
        stop_load = asyncio.Event()
        seen: Counter = Counter()
        created_ok: list[str] = []

        async def load() -> None:  # concurrent clients through the whole outage
            while not stop_load.is_set():
                r = await _request(http, "POST", base, json={"application_id": "app-1"}, headers=h)
                seen[(r.status_code, r.json().get("error"))] += 1
                if r.status_code == 201:
                    created_ok.append(r.json()["agent_session_id"])
                r = await _request(http, "GET", f"{base}/{before['agent_session_id']}", headers=h)
                seen[(r.status_code, r.json().get("error"))] += 1
                await asyncio.sleep(0.05)

        loaders = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(1)
        s.pg.stop()
        try:
            r = await _request(http, "GET", f"{s.base_url}/ready")
            assert r.status_code == 503 and r.json()["dependency"] == "postgres", r.text
            outage = [await _request(http, "POST", base, json={"application_id": "app-1"}, headers=h),
                      await _request(http, "GET", f"{base}/{before['agent_session_id']}", headers=h),
                      await _request(http, "PATCH", f"{base}/{before['agent_session_id']}/suspend", headers=h)]
            for r in outage:
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "postgres_unavailable", r.text
            await asyncio.sleep(10 - 3)  # about 10 s without Postgres in all
        finally:
            s.pg.start()
        # Recovers without restarting the API or the worker.
        deadline = time.monotonic() + 20
        while (await _request(http, "GET", f"{s.base_url}/ready")).status_code != 200:
            assert time.monotonic() < deadline, s.tail()
            await asyncio.sleep(0.3)
        await asyncio.sleep(1)
        stop_load.set()
        await asyncio.gather(*loaders)
        r = await _request(http, "POST", base, json={"application_id": "app-1"}, headers=h)
        assert r.status_code == 201, r.text
        created_ok.append(r.json()["agent_session_id"])
        r = await _request(http, "PATCH", f"{base}/{before['agent_session_id']}/suspend", headers=h)
        assert r.status_code == 200, r.text
    # Every answer was a success or a JSON 503 naming Postgres. As in the reference (§11.1), a
    # mutation that committed just before Postgres went away but whose audit record could not be
    # written answers 500 audit_unavailable.
    assert {k for k in seen if k[0] not in (503, 500)} <= {(201, None), (200, None)}, seen
    assert {k for k in seen if k[0] in (503, 500)} <= {(503, "postgres_unavailable"), (500, "audit_unavailable")}, seen
    assert seen[(503, "postgres_unavailable")] > 0, seen
    # Nothing partial: the sessions that got a 201 exist, plus at most those answered
    # audit_unavailable after their commit; every row is a whole session with its spawn event.
    rows = {r["id"] for r in await s.db.fetch("SELECT id FROM sessions WHERE zone_id = %s", (s.zone,))}
    assert {before["agent_session_id"], *created_ok} <= rows
    assert len(rows) <= 1 + len(created_ok) + seen[(500, "audit_unavailable")]
    spawned = await s.db.fetchval("SELECT count(*) FROM caracal_outbox "
                                  "WHERE zone_id = %s AND dedupe_key LIKE 'spawn:%%'", (s.zone,))
    assert spawned == len(rows)
    assert s.api.poll() is None and s.worker.poll() is None


async def test_temporal_down_30s_under_mixed_load_fails_no_request_and_converges(fault_stack: FaultStack):
    """Temporal stopped for 30 s while clients create, suspend, resume, delegate, invoke and delete:
    every request succeeds (commands never wait on Temporal), the notices wait in the outbox, and
    afterwards every workflow converges on its row with each transition applied once."""
    s = fault_stack
    base = f"{s.base_url}/zones/{s.zone}"
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    seen: Counter = Counter()
    roots: list[str] = []
    sessions: list[str] = []
    invocations: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as http:
        h = s.headers()
        r = await http.put(f"{base}/resources/res-1", json={"identifier": "urn:a", "scopes": ["read"]}, headers=op)
        assert r.status_code == 200, r.text
        r = await http.post(f"{base}/agent-services", headers=h,
                            json={"application_id": "app-1", "endpoint_url": "https://svc.example/a"})
        service = r.json()["id"]

        async def call(method: str, path: str, expect: int, headers: dict[str, str] = h, **kw) -> dict:
            r = await http.request(method, f"{base}{path}", headers=headers, **kw)
            seen[(method, path.split("/")[1], r.status_code)] += 1
            assert r.status_code == expect, (method, path, r.status_code, r.text)
            return r.json() if r.content else {}

        async def lifecycle(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                root = (await call("POST", "/agents", 201, json={"application_id": "app-1"},
                                   headers={**h, "Idempotency-Key": f"mixed-{n}-{i}"}))["agent_session_id"]
                child = (await call("POST", "/agents", 201, json={"application_id": "app-1", "parent_id": root}))
                peer = (await call("POST", "/agents", 201, json={"application_id": "app-1"}))["agent_session_id"]
                await call("POST", "/delegations", 201, json={
                    "source_session_id": root, "target_session_id": peer, "issuer_application_id": "app-1",
                    "receiver_application_id": "app-1", "resource_id": "res-1", "scopes": ["read"],
                    "ttl_seconds": 600})
                assert await call("PATCH", f"/agents/{root}/suspend", 200) == {"suspended": 2}
                assert await call("PATCH", f"/agents/{root}/resume", 200) == {"resumed": 2}
                inv = (await call("POST", "/invocations", 201, json={
                    "service_id": service, "idempotency_key": f"inv-{n}-{i}", "method": "run",
                    "source_session_id": root}))["id"]
                await call("PATCH", f"/invocations/{inv}/start", 200)
                await call("PATCH", f"/invocations/{inv}/complete", 200, json={"status": "succeeded"})
                await call("DELETE", f"/agents/{root}", 204)
                await call("DELETE", f"/agents/{peer}", 204)
                roots.append(root)
                sessions.extend([root, child["agent_session_id"], peer])
                invocations.append(inv)
                await asyncio.sleep(0.05)

        loaders = [asyncio.create_task(lifecycle(n)) for n in range(3)]
        await asyncio.sleep(3)
        s.temporal.stop()
        outage_started = time.monotonic()
        try:
            await asyncio.sleep(10)
            r = await http.get(f"{s.base_url}/ready")
            backlog = r.json()["workflow_outbox"]
            assert r.status_code == 200 and backlog["temporal"] == "unreachable" and backlog["backlog"] > 0, (
                r.text, seen, [t.exception() for t in loaders if t.done()])
            await asyncio.sleep(30 - (time.monotonic() - outage_started))
            done_in_outage = len(roots)
        finally:
            s.temporal.start()
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*loaders)
    assert done_in_outage >= 10, seen
    print(f"{len(roots)} lifecycles ({sum(seen.values())} requests), {done_in_outage} by the end of the outage")

    client = await Client.connect(s.temporal.address)
    rows = {r["id"]: r["status"] for r in await s.db.fetch("SELECT id, status FROM sessions WHERE zone_id = %s",
                                                           (s.zone,))}
    assert set(rows) == set(sessions) and set(rows.values()) == {"terminated"}
    # Roots: created, suspended, resumed, terminated → three SessionStatus upserts, once each.
    await _converged(s, client, [client.get_workflow_handle(session_workflow_id(s.zone, sid)) for sid in roots],
                     dict.fromkeys(roots, "terminated"), expected_upserts=["suspended", "active", "terminated"])
    others = [sid for sid in sessions if sid not in set(roots)]
    await _converged(s, client, [client.get_workflow_handle(session_workflow_id(s.zone, sid)) for sid in others],
                     dict.fromkeys(others, "terminated"))
    # Invocations: created, started, completed → running, succeeded.
    await _converged(s, client, [client.get_workflow_handle(invocation_workflow_id(s.zone, i)) for i in invocations],
                     dict.fromkeys(invocations, "succeeded"), expected_upserts=["running", "succeeded"])


@pytest.mark.parametrize("fault_stack", [{"SERVICE_AGENT_LEASE_SECONDS": "2"}], indirect=True)
async def test_deadlines_due_while_worker_down_settle_within_5s_of_return(fault_stack: FaultStack):
    s = fault_stack
    async with httpx.AsyncClient() as http:
        h = s.headers()
        base = f"{s.base_url}/zones/{s.zone}"
        task = (await _request(http, "POST", f"{base}/agents", json={"application_id": "app-1", "ttl_seconds": 2},
                               headers=h)).json()["agent_session_id"]
        service = (await _request(http, "POST", f"{base}/agents",
                                  json={"application_id": "app-1", "lifecycle": "service"},
                                  headers=h)).json()["agent_session_id"]
        holder = (await _request(http, "POST", f"{base}/agents", json={"application_id": "app-1", "ttl_seconds": 600},
                                 headers=h)).json()["agent_session_id"]
        svc = (await _request(http, "POST", f"{base}/agent-services", headers=h,
                              json={"application_id": "app-1", "endpoint_url": "https://svc.example/x"})).json()["id"]
        inv = (await _request(http, "POST", f"{base}/invocations", headers=h, json={
            "service_id": svc, "idempotency_key": "k1", "method": "run", "source_session_id": holder,
            "timeout_ms": 1500, "retry_policy": {"max_attempts": 1}})).json()["id"]
        assert (await _request(http, "PATCH", f"{base}/invocations/{inv}/start", headers=h)).status_code == 200
        s.kill_worker()
        await asyncio.sleep(4)  # every deadline falls due while no worker runs
        assert (await s.db.fetchval("SELECT status FROM sessions WHERE id = %s", (task,))) == "active"
        returned = time.monotonic()
        s.start_worker()

        async def settled() -> bool:
            rows = await s.db.fetch("SELECT id, status FROM sessions WHERE id = ANY(%s)", ([task, service],))
            status = {r["id"]: r["status"] for r in rows}
            inv_status = await s.db.fetchval("SELECT status FROM agent_invocations WHERE id = %s", (inv,))
            return status[task] == "expired" and status[service] == "suspended" and inv_status == "timed_out"

        while not await settled():
            assert time.monotonic() - returned < 5 + 3, "not settled within 5 s of the worker's return (+3 s start-up)"
            await asyncio.sleep(0.1)
        took = time.monotonic() - returned
    print(f"settled {took:.2f}s after the worker process was started")
