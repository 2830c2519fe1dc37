"""What every scenario shares: configuration, the closed-loop load generator, statistics, result
rows with their targets, and fresh benchmark zones seeded through the operator directory routes."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.httpclient import TRANSPORT_ERRORS, Client, Response
from devstack.keys import SigningKey
from devstack.tokens import mint_token

# ------------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    base_url: str
    operator_token: str
    signing_key: SigningKey
    issuer: str
    scope: str = "agent:lifecycle"
    quick: bool = False
    scenarios: list[str] = field(default_factory=list)  # empty: all
    out: str | None = None
    database_url: str | None = None
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    # Sessions per zone / per application the harness plans for when it needs many sessions
    # (the server's MAX_AGENTS_PER_ZONE / MAX_AGENTS_PER_APP; defaults are the server defaults).
    zone_capacity: int = 50
    app_capacity: int = 200
    setup_concurrency: int = 16
    # scenario parameters; None: the mode's default (see PARAMS)
    expiry_live: int | None = None
    expiry_probes: int | None = None
    heartbeat_sessions: int | None = None
    heartbeat_interval: float | None = None
    heartbeat_duration: float | None = None
    tree_size: int | None = None
    tree_fanout: int | None = None
    impact_edges: int | None = None
    impact_sessions: int | None = None
    follow_curve_rates: list[int] | None = None
    follow_curve_mix_rates: list[int] | None = None
    follow_curve_seconds: float | None = None
    feed_latency_commands: int | None = None
    notes: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: time.strftime("%m%d%H%M") + uuid.uuid4().hex[:4])
    verbose: bool = True

    def param(self, name: str) -> Any:
        value = getattr(self, name, None)
        return PARAMS["quick" if self.quick else "full"][name] if value is None else value


# Counts per mode. Requests are per concurrency level.
PARAMS: dict[str, dict[str, Any]] = {
    "full": {
        "create_requests": {1: 200, 16: 480, 64: 960},
        "get_requests": {1: 1000, 16: 4000},
        "list_requests": {1: 300, 16: 1200},
        "list_rows": 120,
        "delegate_requests": {1: 200, 16: 480},
        "delegate_endpoints": 20,
        "authority_requests": {1: 1000, 16: 4000},
        "impact_requests": {1: 40, 16: 160},
        "impact_edges": 10_000,
        "impact_sessions": 2_000,
        "tree_size": 1_000,
        "tree_fanout": 10,
        "expiry_live": 10_000,
        "expiry_probes": 200,
        "expiry_lead_s": 12.0,
        "expiry_window_s": 20.0,
        "heartbeat_sessions": 1_000,
        "heartbeat_interval": 5.0,
        "heartbeat_duration": 300.0,
        "settle_timeout_s": 60.0,
        "follow_idle": 50,
        "follow_burst": 500,
        "follow_rates": [50, 100, 150],
        "follow_seconds": 20,
        "follow_curve_rates": [50, 100, 200, 400],
        "follow_curve_mix_rates": [150],
        "follow_curve_seconds": 60,
        "follow_curve_lag_sample": 300,
        "feed_latency_commands": 500,
        "bulk_edges": 1_000,
        "bulk_sources": 100,
        "bulk_repeats": 3,
    },
    "quick": {
        "create_requests": {1: 5, 16: 16, 64: 64},
        "get_requests": {1: 20, 16: 64},
        "list_requests": {1: 10, 16: 32},
        "list_rows": 30,
        "delegate_requests": {1: 5, 16: 16},
        "delegate_endpoints": 4,
        "authority_requests": {1: 20, 16: 64},
        "impact_requests": {1: 5, 16: 16},
        "impact_edges": 300,
        "impact_sessions": 60,
        "tree_size": 40,
        "tree_fanout": 10,
        "expiry_live": 50,
        "expiry_probes": 10,
        "expiry_lead_s": 3.0,
        "expiry_window_s": 3.0,
        "heartbeat_sessions": 20,
        "heartbeat_interval": 5.0,
        "heartbeat_duration": 15.0,
        "settle_timeout_s": 30.0,
        "follow_idle": 5,
        "follow_burst": 32,
        "follow_rates": [20],
        "follow_seconds": 2,
        "follow_curve_rates": [10],
        "follow_curve_mix_rates": [20],
        "follow_curve_seconds": 3,
        "follow_curve_lag_sample": 10,
        "feed_latency_commands": 20,
        "bulk_edges": 20,
        "bulk_sources": 4,
        "bulk_repeats": 1,
    },
}


def log(cfg: Config, message: str) -> None:
    if cfg.verbose:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# errors and hints

HINTS = {
    "session_zone_limit_exceeded": (
        "429 session_zone_limit_exceeded: the server's MAX_AGENTS_PER_ZONE is lower than this scenario needs. "
        "Start the server with e.g. MAX_AGENTS_PER_ZONE=100000 MAX_AGENTS_PER_APP=100000 MAX_CHILDREN=2000 "
        "(and pass --zone-capacity 100000 --app-capacity 100000), or keep --zone-capacity at or below the "
        "server's MAX_AGENTS_PER_ZONE so the harness spreads sessions over several zones."),
    "session_limit_exceeded": (
        "429 session_limit_exceeded: the server's MAX_AGENTS_PER_APP is lower than --app-capacity; raise "
        "MAX_AGENTS_PER_APP on the server or lower --app-capacity."),
    "session_children_limit_exceeded": (
        "429 session_children_limit_exceeded: the server's MAX_CHILDREN is lower than --tree-fanout; raise "
        "MAX_CHILDREN on the server (e.g. MAX_CHILDREN=2000) or lower --tree-fanout."),
    "session_depth_limit_exceeded": (
        "429 session_depth_limit_exceeded: the tree is deeper than MAX_SESSION_DEPTH; raise --tree-fanout."),
    "rate_limited": (
        "429 rate_limited: the server's per-IP rate limiter refused requests; start it with "
        "COORDINATOR_RATE_LIMIT_PER_MIN=0 for benchmarks."),
    "invalid_token": "401: the mandates are not accepted: check --key-dir and --issuer (ISSUER_URL of the server).",
    "operator_token_required": "401/403 on a directory route: check --operator-token.",
}


def hints_for(kinds: Counter | dict[str, int]) -> list[str]:
    found = []
    for kind in kinds:
        for code, hint in HINTS.items():
            if code in kind and hint not in found:
                found.append(hint)
        if (kind.startswith("401") or kind.startswith("403")) and HINTS["invalid_token"] not in found:
            found.append(HINTS["invalid_token"])
    return found


class SetupError(RuntimeError):
    """A scenario could not build what it measures; its message says why (with hints)."""

    def __init__(self, message: str, kinds: Counter | dict[str, int] | None = None) -> None:
        self.kinds = dict(kinds or {})
        self.hints = hints_for(self.kinds)
        super().__init__(message + (f" ({_kinds_text(self.kinds)})" if self.kinds else ""))


def _kinds_text(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n}× {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:4])


def describe(resp: Response) -> str:
    try:
        body = resp.json()
        code = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        code = None
    return f"{resp.status_code} {code or resp.text[:60].strip() or '-'}"


# ------------------------------------------------------------------------------------------------
# load generation


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    bodies: dict[int, Any] = field(default_factory=dict)
    load_start: float = 0.0
    load_end: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def client(concurrency: int, base_url: str, timeout: float = 60.0) -> Client:
    """HTTP/1.1 with keep-alive, at least one pooled connection per concurrent request."""
    return Client(base_url, max(1, concurrency) + 4, timeout)


async def closed_loop(total: int, concurrency: int, call: Callable[[int], Awaitable[Response]], *,
                      expect: tuple[int, ...] = (200,), collect: bool = False) -> Sample:
    """`concurrency` workers issue requests 0..total-1 back to back; each call(i) is timed
    (request sent → body read). Only expected statuses count as successes."""
    sample = Sample()
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < total:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                resp = await call(i)
            except TRANSPORT_ERRORS as exc:
                sample.errors[f"exception {type(exc).__name__}"] += 1
                continue
            elapsed = (time.perf_counter() - t0) * 1000.0
            if resp.status_code in expect:
                sample.latencies_ms.append(elapsed)
                if collect:
                    sample.bodies[i] = resp.json() if resp.content else None
            else:
                sample.errors[describe(resp)] += 1

    sample.load_start = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))
    sample.wall_s = time.perf_counter() - t0
    sample.cpu_s = cpu_seconds() - cpu0
    sample.load_end = os.getloadavg()[0]
    return sample


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class Target:
    metric: str  # a Row attribute (p50, p95, p99, value) or a key of Row.extra
    limit: float
    label: str

    def met(self, row: "Row") -> bool | None:
        value = getattr(row, self.metric, None) if hasattr(row, self.metric) else row.extra.get(self.metric)
        if value is None:
            return None
        return value <= self.limit


@dataclass
class Row:
    scenario: str
    name: str
    concurrency: int | None = None
    requests: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    throughput: float | None = None
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu_pct: float | None = None
    targets: list[Target] = field(default_factory=list)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    verdict: str = "-"

    @property
    def value(self) -> float | None:  # single-measurement rows
        return self.p50

    def judge(self) -> "Row":
        if not self.targets:
            self.verdict = "-"
            return self
        results = [t.met(self) for t in self.targets]
        if any(r is None for r in results):
            self.verdict = "FAIL"
        elif all(results) and self.errors == 0:
            self.verdict = "PASS"
        else:
            self.verdict = "MISS"
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "name": self.name, "concurrency": self.concurrency,
                "requests": self.requests, "p50_ms": _r(self.p50), "p95_ms": _r(self.p95), "p99_ms": _r(self.p99),
                "throughput_per_s": _r(self.throughput), "errors": self.errors, "error_kinds": self.error_kinds,
                "client_cpu_pct_of_one_core": _r(self.client_cpu_pct),
                "targets": [t.label for t in self.targets], "verdict": self.verdict, "notes": self.notes,
                "extra": self.extra}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def latency_row(scenario: str, name: str, concurrency: int | None, sample: Sample, targets: list[Target] = (),
                notes: str = "", **extra: Any) -> Row:
    lat = sample.latencies_ms
    row = Row(scenario, name, concurrency, sample.requests, percentile(lat, 50), percentile(lat, 95),
              percentile(lat, 99), len(lat) / sample.wall_s if sample.wall_s > 0 else None, sample.error_count,
              dict(sample.errors), 100.0 * sample.cpu_s / sample.wall_s if sample.wall_s > 0 else None,
              list(targets), notes, {"wall_s": round(sample.wall_s, 3), "client_cpu_s": round(sample.cpu_s, 3),
                                     "load1_start": sample.load_start, "load1_end": sample.load_end, **extra})
    return row.judge()


def value_row(scenario: str, name: str, value_ms: float | None, targets: list[Target] = (), *,
              concurrency: int | None = None, requests: int = 1, errors: int = 0, notes: str = "",
              **extra: Any) -> Row:
    row = Row(scenario, name, concurrency, requests, value_ms, value_ms, value_ms, None, errors, {}, None,
              list(targets), notes, {"load1": os.getloadavg()[0], **extra})
    return row.judge()


# ------------------------------------------------------------------------------------------------
# zones


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


RESOURCE_ID = "res-1"
RECORD_ID = "ar-1"


@dataclass
class BenchZone:
    id: str
    apps: list[str]
    cfg: Config
    _headers: dict[str, dict[str, str]] = field(default_factory=dict)

    def headers(self, app: str | None = None) -> dict[str, str]:
        app = app or self.apps[0]
        if app not in self._headers:
            token = mint_token(self.cfg.signing_key, issuer=self.cfg.issuer, zone_id=self.id, client_id=app,
                               sid=RECORD_ID, scopes=[self.cfg.scope], ttl_seconds=12 * 3600)
            self._headers[app] = {"Authorization": f"Bearer {token}"}
        return self._headers[app]

    @property
    def operator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.operator_token}"}

    def agents(self, session_id: str | None = None) -> str:
        return f"/zones/{self.id}/agents" + (f"/{session_id}" if session_id else "")


class Zones:
    """Fresh zones `bench-<run>-<label>-<n>`: applications app-1..app-k, resource res-1
    (read, write), authority record ar-1 (user), all seeded through the operator routes."""

    def __init__(self, cfg: Config, http: Client) -> None:
        self.cfg, self.http = cfg, http
        self._n = 0

    async def new(self, label: str, apps: int = 1) -> BenchZone:
        self._n += 1
        zone = BenchZone(f"bench-{self.cfg.run_id}-{label}-{self._n}", [f"app-{k + 1}" for k in range(apps)], self.cfg)
        year = iso(datetime.now(timezone.utc) + timedelta(days=30))
        puts = [(f"applications/{app}", {"registration_method": "managed", "expires_at": None}) for app in zone.apps]
        puts += [(f"resources/{RESOURCE_ID}", {"identifier": f"urn:bench:{zone.id}:docs", "scopes": ["read", "write"]}),
                 (f"authority-records/{RECORD_ID}", {"session_type": "user", "subject_id": "bench-user",
                                                     "expires_at": year})]
        for path, body in puts:
            resp = await self.http.put(f"/zones/{zone.id}/{path}", json=body, headers=zone.operator)
            if resp.status_code not in (200, 201):
                raise SetupError(f"PUT /zones/{zone.id}/{path} answered {resp.status_code}: {resp.text[:200]}",
                                 {describe(resp): 1})
        return zone

    async def many(self, label: str, count: int, apps: int = 1) -> list[BenchZone]:
        zones: list[BenchZone] = []
        for start in range(0, count, 8):
            zones += await asyncio.gather(*(self.new(label, apps) for _ in range(min(8, count - start))))
        return zones

    async def spread(self, label: str, count: int) -> list[tuple[BenchZone, str]]:
        """One (zone, application) slot per session, keeping each zone and application within
        --zone-capacity / --app-capacity (the server's capacity limits)."""
        per_zone = max(1, min(self.cfg.zone_capacity, count))
        apps = max(1, math.ceil(per_zone / max(1, self.cfg.app_capacity)))
        zones = await self.many(label, math.ceil(count / per_zone), apps)
        return [(zones[i // per_zone], zones[i // per_zone].apps[(i % per_zone) // max(1, self.cfg.app_capacity)])
                for i in range(count)]


async def create_sessions(cfg: Config, http: Client, slots: list[tuple[BenchZone, str]],
                          concurrency: int | None = None, progress: str | None = None,
                          **body: Any) -> list[dict[str, Any]]:
    """Create one session per slot (POST /zones/:z/agents); returns the 201 bodies in slot order.
    `body` values may be callables of the slot index."""
    total = len(slots)
    done = 0
    t0 = time.monotonic()

    async def call(i: int) -> Response:
        nonlocal done
        zone, app = slots[i]
        payload = {"application_id": app, "subject_session_id": RECORD_ID}
        for key, value in body.items():
            value = value(i) if callable(value) else value
            if value is not None:
                payload[key] = value
        resp = await http.post(zone.agents(), json=payload, headers=zone.headers(app))
        done += 1
        if progress and done % 1000 == 0:
            log(cfg, f"{progress}: {done}/{total} created ({done / (time.monotonic() - t0):.0f}/s)")
        return resp

    bodies: dict[int, Any] = {}
    todo = list(range(total))
    for attempt in range(3):  # set-up traffic: retry transient failures (503 timeouts, resets)
        # (B023: the closures handed to closed_loop below are awaited within their loop iteration.)
        sample = await closed_loop(len(todo), concurrency or cfg.setup_concurrency, lambda k: call(todo[k]),  # noqa: B023
                                   expect=(201,), collect=True)
        bodies.update({todo[k]: body for k, body in sample.bodies.items()})
        if not sample.errors:
            break
        transient = all(kind.startswith(("503", "502", "504", "exception")) for kind in sample.errors)
        if not transient or attempt == 2:
            raise SetupError(f"creating {total} sessions: {sample.error_count} failed", sample.errors)
        log(cfg, f"creating sessions: retrying {sample.error_count} transient failures ({dict(sample.errors)})")
        todo = [i for i in todo if i not in bodies]
    return [bodies[i] for i in range(total)]
