"""Replicas: two API processes, two workers, two dispatchers on one Postgres and one
Temporal; one of each is killed with SIGKILL under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import httpx
import pytest
from temporalio.client import Client

from tests.faults.conftest import FaultStack
from tests.procfs import api_processes, cpu_ticks
from tests.faults.test_faults import _converged
from workflows.models import session_workflow_id

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("fault_stack", [{"API_PROCESSES": "2"}], indirect=True)
async def test_one_api_process_worker_and_dispatcher_killed_under_load(fault_stack: FaultStack):
    """SIGKILL one API process, one worker and one dispatcher of two while 600 sessions are created
    (with an Idempotency-Key), suspended and deleted at concurrency 16. Only requests on the killed
    process's connections fail; retried (the create with its key) they succeed; every session is
    created once, each transition is applied once, and every workflow converges on its row with the
    surviving worker and dispatcher alone."""
    s = fault_stack
    second_worker = s._spawn("worker", ["worker.py"])
    second_dispatcher = s._spawn("dispatcher", ["-m", "notices"])
    api_pids = api_processes(s.api.pid)
    assert len(api_pids) == 2, api_pids
    base = f"{s.base_url}/zones/{s.zone}/agents"
    lost_connections: Counter[str] = Counter()
    results: dict[int, dict[str, int]] = {}
    ids: dict[int, str] = {}

    async def call(http: httpx.AsyncClient, step: str, method: str, url: str, **kw) -> tuple[httpx.Response, bool]:
        """The request, sent again (same headers, so the same Idempotency-Key) after a lost connection."""
        lost = False
        for _ in range(20):
            try:
                return await http.request(method, url, timeout=30, **kw), lost
            except httpx.TransportError:
                lost = True
                lost_connections[step] += 1
                await asyncio.sleep(0.2)
        raise AssertionError(f"{step}: no answer after 20 attempts")

    async def lifecycle(http: httpx.AsyncClient, n: int) -> None:
        h = s.headers()
        outcome = results.setdefault(n, {})
        r, _ = await call(http, "create", "POST", base, json={"application_id": "app-1"},
                          headers={**h, "Idempotency-Key": f"replica-load-{n}"})
        outcome["create"] = r.status_code
        if r.status_code != 201:
            return
        sid = ids[n] = r.json()["agent_session_id"]
        r, lost = await call(http, "suspend", "PATCH", f"{base}/{sid}/suspend", headers=h)
        # A suspend whose answer was lost may have committed: its retry finds the session suspended.
        outcome["suspend"] = 200 if (lost and r.status_code == 409) else r.status_code
        r, lost = await call(http, "delete", "DELETE", f"{base}/{sid}", headers=h)
        outcome["delete"] = 204 if (lost and r.status_code == 404) else r.status_code
        if len(ids) >= 150:
            a_quarter_created.set()

    killed: dict[str, int] = {}
    a_quarter_created = asyncio.Event()

    async def killer() -> None:
        # Under load whatever the machine's speed: a quarter of the sessions is created, the rest is
        # to come (a fixed two seconds let a fast run end before the kill, with nothing in flight).
        await a_quarter_created.wait()
        # Kill the process that is serving more of the load right now: it has requests in flight.
        before = {pid: cpu_ticks(pid) for pid in api_pids}
        await asyncio.sleep(0.5)
        busier = max(api_pids, key=lambda pid: cpu_ticks(pid) - before[pid])
        killed["api"] = busier
        killed["after_creates"] = len(ids)
        os.kill(busier, signal.SIGKILL)
        s.kill_worker()
        s.kill_dispatcher()

    sem = asyncio.Semaphore(16)

    async def bounded(http: httpx.AsyncClient, n: int) -> None:
        async with sem:
            await lifecycle(http, n)

    try:
        # Fresh connections now and then, so requests keep reaching both API processes.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16, max_keepalive_connections=8)) as http:
            await asyncio.gather(killer(), *(bounded(http, n) for n in range(600)))

        # The killed process had requests in flight: they failed, and succeeded when sent again.
        assert sum(lost_connections.values()) > 0, f"no request was in flight: killed {killed}"
        statuses = Counter(v for o in results.values() for v in o.values())
        assert set(statuses) <= {200, 201, 204}, (statuses, lost_connections)
        assert all(o.get("create") == 201 and o.get("suspend") == 200 and o.get("delete") == 204
                   for o in results.values())
        # The supervisor replaced the killed process; the survivor served throughout.
        deadline = time.monotonic() + 30
        while len(api_processes(s.api.pid)) < 2 or killed["api"] in api_processes(s.api.pid):
            assert time.monotonic() < deadline, api_processes(s.api.pid)
            await asyncio.sleep(0.2)
        survivor = next(pid for pid in api_pids if pid != killed["api"])
        assert survivor in api_processes(s.api.pid)

        # Exactly one session per idempotency key, each transition's event once.
        assert await s.db.fetchval("SELECT count(*) FROM sessions WHERE zone_id = %s", (s.zone,)) == 600
        rows = {r["id"]: r["status"] for r in
                await s.db.fetch("SELECT id, status FROM sessions WHERE zone_id = %s", (s.zone,))}
        assert set(rows.values()) == {"terminated"}
        events = Counter(":".join(e["dedupe_key"].split(":")[:2]) for e in
                         await s.db.fetch("SELECT dedupe_key FROM caracal_outbox WHERE zone_id = %s", (s.zone,)))
        for sid in rows:
            assert [events[f"{kind}:{sid}"] for kind in ("spawn", "suspend", "terminate")] == [1, 1, 1], sid

        # The surviving worker and dispatcher bring every workflow to its row's end state, each
        # status change recorded once.
        client = await Client.connect(s.temporal.address)
        handles = [client.get_workflow_handle(session_workflow_id(s.zone, sid)) for sid in rows]
        await _converged(s, client, handles, rows, expected_upserts=["suspended", "terminated"], timeout=180)
    finally:
        for proc in (second_worker, second_dispatcher):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
