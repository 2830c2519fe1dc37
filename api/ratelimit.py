"""Rate limits (reference §10) for the whole deployment: fixed one-minute windows.

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
| invocation | zone + client id (or ip) | INVOCATION_RATE_LIMIT_PER_MIN | `check_invocation_rate` (invocation routes) |

The client ip is the socket peer, or with TRUST_PROXY the first X-Forwarded-For address.
Counts are shared by every API process through Postgres (`WindowLimiter`: each process reserves
slices of a window, so a request costs a round trip only once per slice); N processes together
admit the configured limit, not N times it. Memory is bounded: only the current window's counters
are kept (older windows are dropped when a new one starts), and at most MAX_KEYS keys per window;
further keys share one overflow counter per limiter.

Requests re-dispatched internally by the v1 façade (api/routes/v1.py) are not counted again by the
global limiter: the outer request already was. (The reference counts them a second time under the
loopback address, so all façade traffic of a replica shares one global bucket.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from rules.errors import CoordinatorError
from storage import rate_limits
from storage.db import Database

__all__ = ["WindowLimiter", "RateLimitMiddleware", "check_invocation_rate", "client_ip", "limiter_for",
           "INTERNAL_DISPATCH"]

# ASGI scope extension set on requests the v1 façade re-dispatches into the app.
INTERNAL_DISPATCH = "coordinator.internal_dispatch"
MAX_KEYS = 100_000
_OVERFLOW = " overflow"  # no client address or id starts with a space


class WindowLimiter:
    """Counts of the current one-minute window per (limiter, key), for the whole deployment.

    With a database, a process reserves slices of a key's window from `rate_limit_windows`
    (storage/rate_limits.py) and admits requests from its slice without a round trip; a slice is
    1/50 of the limit (at least 1), so N processes together admit the limit, or up to N slices
    fewer when some process's slice is still unused as the window ends. Once a reservation comes
    back short the key is refused here until the window ends. Without a database (unit tests), or
    while Postgres is unreachable, the process counts on its own: each process admits the limit.
    """

    SLICES_PER_WINDOW = 50

    def __init__(self, db: Database | None = None, clock: Callable[[], float] = time.time,
                 max_keys: int = MAX_KEYS) -> None:
        self._db = db
        self._clock = clock
        self._max_keys = max_keys
        self._window: int | None = None
        self._slots: dict[tuple[str, str], _Slot] = {}

    async def hit(self, limiter: str, key: str, limit: int) -> int | None:
        """Count one request; None when admitted, else the seconds until the window ends."""
        if limit <= 0:
            return None
        now = self._clock()
        window = int(now // 60)
        if window != self._window:
            self._start_window(window)
        slot_key = (limiter, key)
        if slot_key not in self._slots and len(self._slots) >= self._max_keys:
            slot_key = (limiter, _OVERFLOW)
        slot = self._slots.get(slot_key)
        if slot is None:
            slot = self._slots[slot_key] = _Slot()
        while slot.allowance <= 0 and not slot.exhausted:
            if slot.reserving is not None:  # another request is reserving for this key: share its slice
                await asyncio.shield(slot.reserving)
                continue
            slot.reserving = asyncio.get_running_loop().create_future()
            try:
                granted = await self._reserve(slot, slot_key, window, limit)
            finally:
                slot.reserving.set_result(None)
                slot.reserving = None
            if window != self._window:  # the window ended while we waited: count in the new one
                return await self.hit(limiter, key, limit)
            slot.allowance += granted
            slot.exhausted = granted == 0
        if slot.allowance > 0:
            slot.allowance -= 1
            return None
        return max(1, math.ceil((window + 1) * 60 - now))

    def _start_window(self, window: int) -> None:
        previous, self._window, self._slots = self._window, window, {}
        if previous is not None and self._db is not None:
            # Old windows are never read again; one process's sweep suffices, any process may do it.
            task = asyncio.get_running_loop().create_task(self._forget(window - 1))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _forget(self, window: int) -> None:
        with contextlib.suppress(Exception):
            await rate_limits.forget_windows_before(self._db, window)  # type: ignore[arg-type]

    async def _reserve(self, slot: _Slot, slot_key: tuple[str, str], window: int, limit: int) -> int:
        want = max(1, limit // self.SLICES_PER_WINDOW)
        if self._db is not None:
            try:
                return await rate_limits.reserve(self._db, slot_key[0], slot_key[1], window, want, limit)
            except CoordinatorError:  # Postgres unreachable: count in this process until it is back
                pass
        granted = max(0, min(want, limit - slot.counted_locally))
        slot.counted_locally += granted
        return granted

    def __len__(self) -> int:
        return len(self._slots)


class _Slot:
    __slots__ = ("allowance", "exhausted", "reserving", "counted_locally")

    def __init__(self) -> None:
        self.allowance = 0  # reserved for this process and not yet used
        self.exhausted = False  # a reservation came back short: refuse until the window ends
        self.reserving: asyncio.Future[None] | None = None
        self.counted_locally = 0


_background: set[asyncio.Task[None]] = set()


def limiter_for(holder: Any) -> WindowLimiter:
    """The limiter kept on `holder` (the app's state, or the Services object), created on first use
    on the services' database."""
    limiter = getattr(holder, "rate_limiter", None)
    if limiter is None:
        services = holder if hasattr(holder, "db") else getattr(holder, "services", None)
        limiter = WindowLimiter(getattr(services, "db", None))
        holder.rate_limiter = limiter
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


async def check_invocation_rate(target: Any, zone_id: str, client_key: str) -> None:
    """The invocation limiter (INVOCATION_RATE_LIMIT_PER_MIN per zone and caller): raises
    CoordinatorError(429, "rate_limited") with Retry-After when exceeded.

    `target` is the Services object (`svc`), the app, `app.state` or the request; `client_key` is the
    token's client id, or the client ip when there is none."""
    holder, settings = _holder_and_settings(target)
    key = f"{zone_id}/{client_key}"  # ids never contain "/"
    retry_after = await limiter_for(holder).hit("invocation", key, settings.INVOCATION_RATE_LIMIT_PER_MIN)
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
        retry = await limiter.hit("global", ip, settings.COORDINATOR_RATE_LIMIT_PER_MIN)
        if retry is not None:
            await _refuse(send, retry, {"error": "rate_limited"})
            return
        path = scope["path"]
        if path == "/ready":
            retry = await limiter.hit("ready", ip, settings.READY_RATE_LIMIT_PER_MIN)
        elif path == "/v1/verify":
            retry = await limiter.hit("verify", ip, settings.VERIFY_RATE_LIMIT_PER_MIN)
            if retry is not None:
                await _refuse(send, retry, {"valid": False, "error": "rate_limited"})
                return
        elif path.startswith("/v1/"):
            retry = await limiter.hit("v1", ip, settings.V1_RATE_LIMIT_PER_MIN)
        if retry is not None:
            await _refuse(send, retry, {"error": "rate_limited"})
            return
        await self.app(scope, receive, send)
