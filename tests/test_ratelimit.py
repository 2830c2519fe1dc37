"""Rate limits (reference §10; §13 cases 18, 110's 429, 115's 429): fixed windows shared through Postgres."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from api.app import create_app
from api.deps import Services
from api.ratelimit import WindowLimiter, check_invocation_rate, limiter_for
from rules.errors import CoordinatorError
from settings import load_settings
from tests.conftest import Zone

LIMITS_OFF = dict(COORDINATOR_RATE_LIMIT_PER_MIN=0, READY_RATE_LIMIT_PER_MIN=0, V1_RATE_LIMIT_PER_MIN=0,
                  VERIFY_RATE_LIMIT_PER_MIN=0, INVOCATION_RATE_LIMIT_PER_MIN=0)


def limited_app(stack, **limits):
    """The app over the session's real services, with other limits (the limiter lives per app)."""
    settings = load_settings(**{**stack.settings.model_dump(), **LIMITS_OFF, **limits})
    svc = stack.services
    return create_app(services=Services(settings, svc.db, svc.temporal, svc.auth))


def client(app, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
                             base_url="http://coordinator.test")


async def fresh_window(stack, margin: float = 10.0) -> None:
    """Wait for the next minute if this one ends within `margin` s (a rollover resets counters), and
    forget the counts earlier tests left in the shared windows."""
    left = 60 - time.time() % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)
    await stack.services.db.execute("DELETE FROM rate_limit_windows")


async def test_601st_request_from_one_ip_in_a_minute_is_refused(stack):
    app = limited_app(stack, COORDINATOR_RATE_LIMIT_PER_MIN=600)
    await fresh_window(stack)
    async with client(app) as http, client(app, "10.0.0.2") as other:
        statuses = [(await http.get("/health")).status_code for _ in range(600)]
        assert statuses == [200] * 600
        r = await http.get("/health")
        assert r.status_code == 429 and r.json() == {"error": "rate_limited"}
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-request-id"]
        # every request counts, whatever the route, and before authentication
        r = await http.get("/zones/z1/agents")
        assert r.status_code == 429 and r.json() == {"error": "rate_limited"}
        # another address has its own window
        assert (await other.get("/health")).status_code == 200


async def test_trust_proxy_keys_on_the_first_forwarded_address(stack):
    for trust, expected in ((True, [200, 200, 429, 200]), (False, [200, 200, 429, 429])):
        app = limited_app(stack, COORDINATOR_RATE_LIMIT_PER_MIN=2, TRUST_PROXY=trust)
        await fresh_window(stack, 2)
        async with client(app) as http:
            got = []
            for forwarded in ("203.0.113.7, 10.0.0.1", "203.0.113.7", "203.0.113.7", "198.51.100.1"):
                got.append((await http.get("/health", headers={"x-forwarded-for": forwarded})).status_code)
        assert got == expected, (trust, got)


async def test_ready_v1_and_verify_limiters(stack, zone: Zone):
    app = limited_app(stack, READY_RATE_LIMIT_PER_MIN=2, V1_RATE_LIMIT_PER_MIN=3, VERIFY_RATE_LIMIT_PER_MIN=2)
    await fresh_window(stack, 3)
    async with client(app) as http:
        for _ in range(2):
            assert (await http.get("/ready")).status_code != 429
        r = await http.get("/ready")
        assert r.status_code == 429 and r.json() == {"error": "rate_limited"} and "retry-after" in r.headers

        # v1: before authentication and before the body
        for _ in range(3):
            r = await http.post("/v1/begin", json={"zone_id": zone.id, "application_id": "app-1",
                                                   "subject_session_id": "ar-1"}, headers=zone.headers())
            assert r.status_code == 201, r.text
        r = await http.post("/v1/begin", content=b"not json")
        assert r.status_code == 429 and r.json() == {"error": "rate_limited"}
        r = await http.post("/v1/end", json={})
        assert r.status_code == 429 and r.json() == {"error": "rate_limited"}

        # verify has its own window and its own body
        for _ in range(2):
            r = await http.post("/v1/verify", json={"zone_id": zone.id})
            assert r.status_code == 400 and r.json() == {"valid": False, "error": "missing_token"}
        r = await http.post("/v1/verify", json={"no": "zone"})  # refused before body validation
        assert r.status_code == 429 and r.json() == {"valid": False, "error": "rate_limited"}
        assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_facade_inner_requests_are_not_counted_twice_by_the_global_limiter(stack, zone: Zone):
    app = limited_app(stack, COORDINATOR_RATE_LIMIT_PER_MIN=2)
    await fresh_window(stack, 3)
    async with client(app) as http:
        for _ in range(2):
            r = await http.post("/v1/begin", json={"zone_id": zone.id, "application_id": "app-1",
                                                   "subject_session_id": "ar-1"}, headers=zone.headers())
            assert r.status_code == 201, r.text
        r = await http.post("/v1/begin", json={}, headers=zone.headers())
        assert r.status_code == 429


async def test_zero_disables(stack):
    app = limited_app(stack)
    async with client(app) as http:
        statuses = {(await http.get("/health")).status_code for _ in range(50)}
        assert statuses == {200}


async def test_invocation_limiter_per_zone_and_caller(stack):
    app = limited_app(stack, INVOCATION_RATE_LIMIT_PER_MIN=2)
    await fresh_window(stack, 1)
    await check_invocation_rate(app.state, "z1", "app-1")
    await check_invocation_rate(app.state, "z1", "app-1")
    with pytest.raises(CoordinatorError) as refused:
        await check_invocation_rate(app.state, "z1", "app-1")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert 1 <= refused.value.fields["retry_after"] <= 60
    await check_invocation_rate(app.state, "z1", "app-2")  # another caller
    await check_invocation_rate(app.state, "z2", "app-1")  # another zone
    await check_invocation_rate(app, "z3", "app-1")  # the app itself works as the holder too
    assert limiter_for(app.state) is limiter_for(app.state)

    # the HTTP answer of that error: 429 rate_limited with Retry-After, through the app's handler
    svc = app.state.services
    for _ in range(2):
        await check_invocation_rate(svc, "z9", "app-1")
    with pytest.raises(CoordinatorError) as refused:
        await check_invocation_rate(svc, "z9", "app-1")
    from api.http import error_response
    from starlette.requests import Request

    response = error_response(Request({"type": "http", "state": {}}), refused.value)
    assert response.status_code == 429 and response.body == b'{"error":"rate_limited"}'
    assert response.headers["retry-after"] == str(refused.value.fields["retry_after"])

    off = limited_app(stack, INVOCATION_RATE_LIMIT_PER_MIN=0)
    for _ in range(10):
        await check_invocation_rate(off.state, "z1", "app-1")


async def test_windows_are_fixed_minutes_and_memory_is_bounded():
    now = [120.0]
    limiter = WindowLimiter(clock=lambda: now[0], max_keys=3)  # no database: this process counts alone
    assert await limiter.hit("g", "a", 2) is None and await limiter.hit("g", "a", 2) is None
    now[0] = 150.5
    assert await limiter.hit("g", "a", 2) == 30  # seconds to the end of the window [120, 180)
    for key in ("b", "c", "d", "e"):
        await limiter.hit("g", key, 100)
    assert len(limiter) <= 4  # 3 keys and the shared overflow counter
    assert await limiter.hit("g", "f", 2) == 30  # f shares the overflow count of d and e
    now[0] = 180.0  # a new window: the old counters are dropped
    assert await limiter.hit("g", "a", 2) is None and len(limiter) == 1


async def test_processes_sharing_a_database_admit_the_limit_together(stack):
    """Three limiters on one database (three API processes), concurrent requests from one address:
    together they admit the limit, less at most one unused slice per process, never more."""
    await fresh_window(stack, 5)
    db = stack.services.db
    limiters = [WindowLimiter(db) for _ in range(3)]
    limit = 600

    async def client_of(limiter: WindowLimiter) -> int:
        return sum([await limiter.hit("global", "10.9.9.9", limit) is None for _ in range(400)])

    admitted = await asyncio.gather(*(client_of(limiter) for limiter in limiters))
    assert limit * 0.9 <= sum(admitted) <= limit, admitted
    assert all(a > 0 for a in admitted)
    used = await db.fetchval("SELECT used FROM rate_limit_windows WHERE limiter = 'global' AND key = '10.9.9.9'")
    assert used >= limit  # the shared count reached the limit: every further reservation comes back empty
    assert await limiters[0].hit("global", "10.9.9.9", limit) is not None


async def test_postgres_unreachable_each_process_counts_alone(stack):
    from rules.errors import CoordinatorError as Unavailable

    class DownDatabase:
        async def fetchval(self, *args, **kwargs):
            raise Unavailable(503, "postgres_unavailable")

    limiter = WindowLimiter(DownDatabase())  # type: ignore[arg-type]
    admitted = [await limiter.hit("global", "10.8.8.8", 5) is None for _ in range(7)]
    assert admitted == [True] * 5 + [False] * 2
