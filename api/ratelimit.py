"""Rate limits (reference §10), kept in memory per replica: fixed one-minute windows.

Windows are `floor(unix time / 60)`; a request is refused when the window's count, after counting
it, exceeds the limit; a limit of 0 disables that limiter. Refusals are 429 `{"error":"rate_limited"}`
(`{"valid":false,"error":"rate_limited"}` on /v1/verify) with `Retry-After` = seconds to the end of
the window.

| limiter | key | setting | where |
|---|---|---|---|
| global | client ip | COORDINATOR_RATE_LIMIT_PER_MIN | every request, before anything else (RateLimitMiddleware) |
| ready | client ip | READY_RATE_LIMIT_PER_MIN | /ready |
| v1 | client ip | V1_RATE_LIMIT_PER_MIN | /v1/* except /v1/verify, before auth and body |
| verify | client ip | VERIFY_RATE_LIMIT_PER_MIN | /v1/verify, before the body |
| invocation | zone + client id (or ip) | INVOCATION_RATE_LIMIT_PER_MIN | `check_invocation_rate`, called by the invocation routes |

The client ip is the socket peer, or with TRUST_PROXY the first X-Forwarded-For address.
Counters live in the process: N replicas admit up to N times each limit. Memory is bounded: only
the current window's counters are kept (older windows are dropped when a new one starts), and at
most MAX_KEYS keys per window; further keys share one overflow counter per limiter.

Requests re-dispatched internally by the v1 façade (api/routes/v1.py) are not counted again by the
global limiter: the outer request already was. (The reference counts them a second time under the
loopback address, so all façade traffic of a replica shares one global bucket.)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from rules.errors import CoordinatorError

__all__ = ["FixedWindowLimiter", "RateLimitMiddleware", "check_invocation_rate", "client_ip", "limiter_for",
           "INTERNAL_DISPATCH"]

# ASGI scope extension set on requests the v1 façade re-dispatches into the app.
INTERNAL_DISPATCH = "coordinator.internal_dispatch"
MAX_KEYS = 100_000
_OVERFLOW = "\x00overflow"


class FixedWindowLimiter:
    """Counters of the current one-minute window, per (limiter, key)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._window: int | None = None
        self._counts: dict[tuple[str, str], int] = {}

    def hit(self, limiter: str, key: str, limit: int) -> int | None:
        """Count one request; None when admitted, else the seconds until the window ends."""
        if limit <= 0:
            return None
        now = self._clock()
        window = int(now // 60)
        if window != self._window:
            self._window = window
            self._counts = {}
        slot = (limiter, key)
        if slot not in self._counts and len(self._counts) >= self._max_keys:
            slot = (limiter, _OVERFLOW)
        count = self._counts.get(slot, 0) + 1
        self._counts[slot] = count
        if count > limit:
            return max(1, math.ceil((window + 1) * 60 - now))
        return None

    def __len__(self) -> int:
        return len(self._counts)


def limiter_for(holder: Any) -> FixedWindowLimiter:
    """The limiter kept on `holder` (the app's state, or the Services object), created on first use."""
    limiter = getattr(holder, "rate_limiter", None)
    if limiter is None:
        limiter = FixedWindowLimiter()
        setattr(holder, "rate_limiter", limiter)
    return limiter


def _holder_and_settings(target: Any) -> tuple[Any, Any]:
    state = target
    if hasattr(target, "app") and hasattr(target, "scope"):  # a Request
        state = target.app.state
    elif hasattr(target, "state") and hasattr(target, "router"):  # the application
        state = target.state
    settings = getattr(state, "settings", None)
    if settings is None:
        raise TypeError("check_invocation_rate needs Services, the app, its state or a request")
    return state, settings


def check_invocation_rate(target: Any, zone_id: str, client_key: str) -> None:
    """The invocation limiter (INVOCATION_RATE_LIMIT_PER_MIN per zone and caller): raises
    CoordinatorError(429, "rate_limited") with Retry-After when exceeded.

    `target` is the Services object (`svc`), the app, `app.state` or the request; `client_key` is the
    token's client id, or the client ip when there is none."""
    holder, settings = _holder_and_settings(target)
    retry_after = limiter_for(holder).hit("invocation", f"{zone_id}\x00{client_key}",
                                          settings.INVOCATION_RATE_LIMIT_PER_MIN)
    if retry_after is not None:
        raise CoordinatorError(429, "rate_limited", retry_after=retry_after)


def client_ip(scope: Scope, trust_proxy: bool) -> str:
    if trust_proxy:
        forwarded = Headers(scope=scope).get("x-forwarded-for")
        if forwarded:
            first = forwarded.split(",", 1)[0].strip()
            if first:
                return first
    client = scope.get("client")
    return client[0] if client else "unknown"


def is_internal(scope: Scope) -> bool:
    return bool((scope.get("extensions") or {}).get(INTERNAL_DISPATCH))


async def _refuse(send: Send, retry_after: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(retry_after).encode())]})
    await send({"type": "http.response.body", "body": payload})


class RateLimitMiddleware:
    """The ip-keyed limiters, before routing and authentication."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_internal(scope):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        settings = state.settings
        limiter = limiter_for(state)
        ip = client_ip(scope, settings.TRUST_PROXY)
        retry = limiter.hit("global", ip, settings.COORDINATOR_RATE_LIMIT_PER_MIN)
        if retry is not None:
            await _refuse(send, retry, {"error": "rate_limited"})
            return
        path = scope["path"]
        if path == "/ready":
            retry = limiter.hit("ready", ip, settings.READY_RATE_LIMIT_PER_MIN)
        elif path == "/v1/verify":
            retry = limiter.hit("verify", ip, settings.VERIFY_RATE_LIMIT_PER_MIN)
            if retry is not None:
                await _refuse(send, retry, {"valid": False, "error": "rate_limited"})
                return
        elif path.startswith("/v1/"):
            retry = limiter.hit("v1", ip, settings.V1_RATE_LIMIT_PER_MIN)
        if retry is not None:
            await _refuse(send, retry, {"error": "rate_limited"})
            return
        await self.app(scope, receive, send)
