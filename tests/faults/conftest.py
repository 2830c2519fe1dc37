"""Fault-injection harness: every part is a real process we can kill.

Each test gets its own Postgres (ephemeral data dir), a Temporal dev server on a SQLite file (so
it survives a restart), and the API (`python -m api`), the worker (`python worker.py`) and the
workflow-outbox dispatcher (`python -m notices`) as subprocesses, talking over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.keys import SigningKey, generate_signing_key, write_jwks
from devstack.postgres import PostgresProcess, free_port, start_postgres
from devstack.temporal import TemporalProcess, start_temporal
from devstack.tokens import mint_token
from storage.db import Database
from storage.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
ISSUER = "http://issuer.faults/sts"
OPERATOR_TOKEN = "fault-operator-token-0123456789abcdef"


@dataclass
class FaultStack:
    tmp: Path
    pg: PostgresProcess
    temporal: TemporalProcess
    key: SigningKey
    env: dict[str, str]
    port: int
    db: Database | None = None
    api: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    dispatcher: subprocess.Popen | None = None
    zone: str = field(default_factory=lambda: f"fz-{uuid.uuid4().hex[:8]}")
    logs: list[Path] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", ["worker.py"])

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()
        self.worker = None

    def start_dispatcher(self) -> None:
        self.dispatcher = self._spawn("dispatcher", ["-m", "notices"])

    def kill_dispatcher(self) -> None:
        assert self.dispatcher is not None
        os.killpg(self.dispatcher.pid, signal.SIGKILL)
        self.dispatcher.wait()
        self.dispatcher = None

    async def start_api(self) -> None:
        self.api = self._spawn("api", ["-m", "api"])
        await self.wait_ready()

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                try:
                    r = await http.get(f"{self.base_url}/ready", timeout=5)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"stack not ready; logs: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "".join(p.read_text().splitlines(True)[-30:]) for p in self.logs)

    def token(self, app: str = "app-1", sid: str = "ar-1", scopes: list[str] | None = None) -> str:
        return mint_token(self.key, issuer=ISSUER, zone_id=self.zone, client_id=app, sid=sid,
                          scopes=["agent:lifecycle", *(scopes or [])], ttl_seconds=3600)

    def headers(self, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kw)}"}

    async def seed(self, http: httpx.AsyncClient) -> None:
        op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        future = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        record = {"session_type": "user", "subject_id": "s", "expires_at": future}
        for path, body in (("applications/app-1", {"registration_method": "managed", "expires_at": None}),
                           ("authority-records/ar-1", record)):
            r = await http.put(f"{self.base_url}/zones/{self.zone}/{path}", json=body, headers=op)
            assert r.status_code == 200, r.text

    def stop(self) -> None:
        for proc in (self.api, self.dispatcher, self.worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
async def fault_stack(tmp_path: Path, request) -> FaultStack:
    overrides: dict[str, str] = getattr(request, "param", {}) or {}
    pg = start_postgres(tmp_path / "pg", free_port(), ephemeral=True)
    pg.create_database("coordinator")
    upgrade(pg.url("coordinator"))
    temporal = start_temporal(port=free_port(), db_file=tmp_path / "temporal.db", log_file=tmp_path / "temporal.log")
    key = generate_signing_key(kid="faults")
    write_jwks(key, tmp_path / "jwks.json")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": pg.url("coordinator"), "TEMPORAL_ADDRESS": temporal.address,
           "TEMPORAL_TASK_QUEUE": f"faults-{uuid.uuid4().hex[:6]}", "PORT": str(port), "ISSUER_URL": ISSUER,
           "JWKS_FILE": str(tmp_path / "jwks.json"), "CARACAL_COORDINATOR_TOKEN": OPERATOR_TOKEN,
           "MAX_AGENTS_PER_ZONE": "100000", "MAX_AGENTS_PER_APP": "100000", "MAX_CHILDREN": "1000",
           "COORDINATOR_RATE_LIMIT_PER_MIN": "0",
           "INVOCATION_RATE_LIMIT_PER_MIN": "0", "LOG_LEVEL": "WARNING", **overrides}
    stack = FaultStack(tmp_path, pg, temporal, key, env, port)
    stack.db = Database(pg.url("coordinator"), max_size=4)
    await stack.db.open()
    stack.start_worker()
    stack.start_dispatcher()
    await stack.start_api()
    async with httpx.AsyncClient() as http:
        await stack.seed(http)
    yield stack
    stack.stop()
    await stack.db.close()
    temporal.stop()
    pg.stop()
