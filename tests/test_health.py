"""Health, readiness and metrics (reference §4.1-4.3, §11.2, §13 cases 108-109)."""

from __future__ import annotations

import httpx

from api.app import create_app
from api.deps import Services
from devstack.postgres import free_port
from settings import load_settings
from storage.db import Database
from tests.conftest import eventually, OPERATOR_TOKEN, Stack, Zone

OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def app_with(stack: Stack, db: Database | None = None, **overrides):
    settings = load_settings(**{**stack.settings.model_dump(), **overrides})
    services = Services(settings, db or stack.db, stack.services.temporal, stack.services.auth)
    return create_app(services=services)


async def call(app, method: str, path: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        return await http.request(method, path, **kw)


async def test_health_and_ready(stack: Stack):
    assert (await stack.http.get("/health")).json() == {"ok": True}
    await stack.workflows_caught_up()

    async def worker_polling():  # the in-process worker may not have polled yet at session start
        r = await stack.http.get("/ready")
        return r if r.json().get("worker") == "polling" else None
    r = await eventually(worker_polling, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["ok"] is True and body["worker"] == "polling", body
    assert body["workflow_outbox"]["backlog"] == 0 and body["workflow_outbox"]["temporal"] == "ok", body
    assert body["workflow_outbox"]["dispatchers"] >= 1, body


async def test_ready_names_the_failing_dependency(stack: Stack):
    dead_pg = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout_s=1)
    await dead_pg.open(wait=False)
    try:
        r = await call(app_with(stack, db=dead_pg), "GET", "/ready")
        assert r.status_code == 503 and r.json() == {"ok": False, "error": "postgres_unreachable",
                                                     "dependency": "postgres"}
    finally:
        await dead_pg.close()
    r = await call(app_with(stack, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), "GET", "/ready")
    assert r.status_code == 503 and r.json() == {"ok": False, "error": "redis_unreachable", "dependency": "redis"}


async def test_ready_answers_draining_after_shutdown_began(stack: Stack):
    app = app_with(stack)
    app.state.draining = True
    r = await call(app, "GET", "/ready")
    assert r.status_code == 503 and r.json() == {"ok": False, "draining": True}


async def test_metrics_need_the_operator_token_and_a_bearer_when_published(stack: Stack, zone: Zone):
    await zone.start()
    r = await stack.http.get("/metrics", headers=OP)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'coordinator_sessions{status="active"}' in r.text
    assert "coordinator_http_requests_total" in r.text
    assert (await stack.http.get("/metrics", headers=zone.headers())).json() == {"error": "operator_token_required"}
    hmac = "ab" * 32
    published = app_with(stack, CARACAL_MODE="stable", IDEMPOTENCY_HMAC_KEY=hmac)
    r = await call(published, "GET", "/metrics", headers=OP)
    assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
    with_bearer = app_with(stack, CARACAL_MODE="stable", IDEMPOTENCY_HMAC_KEY=hmac, METRICS_BEARER=OPERATOR_TOKEN)
    assert (await call(with_bearer, "GET", "/metrics", headers=OP)).status_code == 200


async def test_stats_for_the_operator(stack: Stack, zone: Zone):
    await zone.start()
    r = await stack.http.get("/stats", headers=OP)
    assert r.status_code == 200 and r.json()["sessions"]["active"] >= 1
    assert set(r.json()) == {"sessions", "invocations", "outbox", "delegations", "idempotency"}
