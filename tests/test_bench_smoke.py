"""The benchmark harness in --quick mode, over real HTTP, against the test stack served by an
in-process uvicorn on a free port: every scenario runs and reports no error."""

from __future__ import annotations

import asyncio
import contextlib
import json

import uvicorn

from api.app import create_app
from bench.core import Config
from bench.runner import run_bench
from bench.scenarios import SCENARIOS
from devstack.postgres import free_port
from tests.conftest import ISSUER, OPERATOR_TOKEN


async def test_bench_quick_smoke(stack, signing_key, postgres, temporal_server, tmp_path):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(services=stack.services), host="127.0.0.1", port=port,
                                           log_level="warning"))
    server.capture_signals = contextlib.nullcontext  # leave pytest's signal handlers alone
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started
        out = tmp_path / "bench.json"
        cfg = Config(base_url=f"http://127.0.0.1:{port}", operator_token=OPERATOR_TOKEN, signing_key=signing_key,
                     issuer=ISSUER, quick=True, out=str(out), database_url=postgres.url("coordinator"),
                     temporal_address=temporal_server.address, heartbeat_duration=3.0, heartbeat_interval=1.0,
                     verbose=False)
        await run_bench(cfg)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)

    data = json.loads(out.read_text())
    assert data["meta"]["machine"]["cpu_count"] and data["meta"]["date"] and "commit" in data["meta"]["git"]
    by_name = {s["name"]: s for s in data["scenarios"]}
    assert set(by_name) == {s.key for s in SCENARIOS}
    for name, entry in by_name.items():
        # RSS finds nothing to measure here (no `python -m api` / worker.py processes): skipping is fine.
        assert entry["status"] == "ok" or (name == "rss" and entry["status"] == "skipped"), entry
        assert entry["errors"] == 0, entry
        assert all(row["errors"] == 0 for row in entry["rows"]), entry
    latency = [r for s in data["scenarios"] if s["name"] not in ("rss",) for r in s["rows"]]
    assert all(r["p50_ms"] is not None for r in latency), latency
    assert by_name["heartbeat"]["rows"][0]["extra"]["lease_losses"] == 0
    assert by_name["impact"]["rows"][0]["extra"]["graph"]["edges"] == 300
