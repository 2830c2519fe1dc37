"""Several API processes on one database: `python -m api` with API_PROCESSES=2 over the
session's Postgres. Rate limits hold for the deployment, an identity revoked through one process is
refused by every process, and SIGTERM drains both and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.postgres import free_port
from tests.conftest import Stack, Zone
from tests.procfs import api_processes, cpu_ticks

REPO = Path(__file__).resolve().parents[1]
RATE_LIMIT = 300


def _env_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ApiProcesses:
    def __init__(self, stack: Stack, tmp_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {name: _env_value(value) for name, value in stack.settings.model_dump().items() if value is not None}
        env.update(PORT=str(self.port), API_PROCESSES="2", COORDINATOR_RATE_LIMIT_PER_MIN=str(RATE_LIMIT),
                   LOG_LEVEL="warning")
        self.log = tmp_path / "api.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "api"], cwd=REPO, env={**os.environ, **env},
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    if (await http.get(f"{self.base_url}/health")).status_code == 200 and \
                            len(api_processes(self.proc.pid)) == 2:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(self.log.read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
async def api(stack: Stack, tmp_path: Path):
    await stack.db.execute("DELETE FROM rate_limit_windows")
    processes = ApiProcesses(stack, tmp_path)
    try:
        await processes.ready()
        yield processes
    finally:
        code = processes.stop()
    assert code == 0, processes.log.read_text()  # SIGTERM: both processes drained, the supervisor exits 0


def fresh_connections() -> httpx.AsyncClient:
    """A client that opens a new connection per request, so requests spread over both processes."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


async def test_two_api_processes_admit_the_configured_rate_limit_together(api: ApiProcesses):
    left = 60 - time.time() % 60
    if left < 15:  # the count must stay in one window
        await asyncio.sleep(left + 0.1)
    workers = api_processes(api.proc.pid)
    cpu_before = {pid: cpu_ticks(pid) for pid in workers}
    statuses: Counter[int] = Counter()
    sem = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient) -> None:
        async with sem:
            statuses[(await http.get(f"{api.base_url}/health")).status_code] += 1

    async with fresh_connections() as http:
        await asyncio.gather(*(one(http) for _ in range(2 * RATE_LIMIT)))
    assert set(statuses) == {200, 429}, statuses
    # Together the two processes admit the configured limit, never more, at most 10 % less.
    assert RATE_LIMIT * 0.9 <= statuses[200] <= RATE_LIMIT, statuses
    # Both processes served (each burnt CPU time on the requests).
    assert all(cpu_ticks(pid) - cpu_before[pid] >= 5 for pid in workers), (cpu_before, workers)


async def test_an_identity_revoked_through_one_process_is_refused_by_both(api: ApiProcesses, zone: Zone):
    url = f"{api.base_url}/zones/{zone.id}/agents"
    headers = zone.headers(app="app-2", sid="ar-2")
    async with fresh_connections() as http:
        # Both processes find the identity live (and keep it: IDENTITY_CACHE_SECONDS is 5 s).
        assert {(await http.get(url, headers=headers)).status_code for _ in range(20)} == {200}
        r = await http.post(f"{api.base_url}/zones/{zone.id}/authority-records/ar-2/revoke",
                            headers=zone.operator_headers)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.2)  # the change's NOTIFY reaches the other process
        answers = [await http.get(url, headers=headers) for _ in range(20)]
        assert {(r.status_code, r.json()["error"]) for r in answers} == {(401, "identity_revoked")}
        # Another identity of the zone still passes.
        assert (await http.get(url, headers=zone.headers())).status_code == 200


async def test_metrics_from_either_process_count_the_requests_of_both(api: ApiProcesses, zone: Zone):
    def health_200(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("coordinator_http_requests_total{")
                   and 'route="/health"' in line and 'status="200"' in line)

    async with fresh_connections() as http:
        scrape = (await http.get(f"{api.base_url}/metrics", headers=zone.operator_headers))
        assert scrape.status_code == 200, scrape.text
        before = health_200(scrape.text)
        for _ in range(40):
            assert (await http.get(f"{api.base_url}/health")).status_code == 200
        # Whichever process answers each scrape, it reports the 40 requests served by both.
        for _ in range(4):
            assert health_200((await http.get(f"{api.base_url}/metrics", headers=zone.operator_headers)).text) \
                == before + 40
