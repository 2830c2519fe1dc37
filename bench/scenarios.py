"""The scenarios. Each seeds its own zone(s) and returns result rows.

Targets (docs/DESIGN.md "Targets"): the reference coordinator's p50 on a 2-core machine of this kind,
with an aiohttp client, and the absolute targets of our design.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench.httpclient import TRANSPORT_ERRORS, Client, Response
from bench.core import (
    RECORD_ID, RESOURCE_ID, BenchZone, Config, Row, Sample, SetupError, Target, Zones, client, closed_loop,
    cpu_seconds, create_sessions, describe, latency_row, log, parse_iso, value_row,
)


@dataclass
class Ctx:
    cfg: Config
    http: Client  # setup traffic
    zones: Zones

    def p(self, name: str) -> Any:
        return self.cfg.param(name)

    def client(self, concurrency: int) -> Client:
        return client(concurrency, self.cfg.base_url)


def p50(limit: float, why: str) -> Target:
    return Target("p50", limit, f"p50 ≤ {limit:g} ms ({why})")


def p50_below(limit: float, why: str) -> Target:
    return Target("p50", limit, f"p50 < {limit:g} ms ({why})")


async def measure(ctx: Ctx, concurrency: int, total: int, call: Callable[[Client, int], Awaitable],
                  *, expect: tuple[int, ...] = (200,), warmup: int | None = None, collect: bool = False):
    """Open a client sized to `concurrency`, warm its connections up, then measure `total` calls."""
    async with ctx.client(concurrency) as http:
        n = concurrency if warmup is None else warmup
        if n:
            await closed_loop(n, concurrency, lambda i: call(http, -1 - i), expect=expect)
        return await closed_loop(total, concurrency, lambda i: call(http, i), expect=expect, collect=collect)


# ------------------------------------------------------------------------------------------------
# 1. session create

CREATE_TARGETS = {1: [p50(25.5, "1.5× the reference's 17 ms")],
                  16: [p50_below(260, "ahead of the reference's 260 ms; zone lock")]}


async def session_create(ctx: Ctx) -> list[Row]:
    rows = []
    for concurrency, total in ctx.p("create_requests").items():
        slots = await ctx.zones.spread(f"create-c{concurrency}", total + concurrency)  # + warm-up
        async def call(http: Client, i: int) -> Response:
            zone, app = slots[i if i >= 0 else total - 1 - i]  # noqa: B023 (awaited in this iteration)
            return await http.post(zone.agents(), json={"application_id": app, "subject_session_id": RECORD_ID},
                                   headers=zone.headers(app))
        sample = await measure(ctx, concurrency, total, call, expect=(201,))
        zones = len({z.id for z, _ in slots})
        rows.append(latency_row("create", "session create", concurrency, sample, CREATE_TARGETS.get(concurrency, []),
                                notes=f"{zones} zone(s)" if zones > 1 else "", zones=zones))
    return rows


# ------------------------------------------------------------------------------------------------
# 2. session GET

async def session_get(ctx: Ctx) -> list[Row]:
    zone = await ctx.zones.new("get")
    bodies = await create_sessions(ctx.cfg, ctx.http, [(zone, zone.apps[0])] * 20)
    ids = [b["agent_session_id"] for b in bodies]
    headers = zone.headers()
    targets = {1: [p50(5.7, "reference 5.7 ms")], 16: [p50(37, "reference 37 ms")]}
    rows = []
    for concurrency, total in ctx.p("get_requests").items():
        sample = await measure(ctx, concurrency, total,
                               lambda http, i: http.get(zone.agents(ids[i % len(ids)]), headers=headers))
        rows.append(latency_row("get", "session GET", concurrency, sample, targets[concurrency]))
    return rows


# ------------------------------------------------------------------------------------------------
# 3. list, limit 100

async def fill_rows(ctx: Ctx, zone: BenchZone, rows: int) -> None:
    """`rows` sessions in one zone within the zone's capacity: all batches but the last are
    terminated (terminated rows are listed too, and do not count against the capacity)."""
    cap = max(1, min(ctx.cfg.zone_capacity, ctx.cfg.app_capacity))
    remaining = rows
    while remaining > 0:
        batch = min(cap, remaining)
        bodies = await create_sessions(ctx.cfg, ctx.http, [(zone, zone.apps[0])] * batch)
        remaining -= batch
        if remaining > 0:
            ids = [b["agent_session_id"] for b in bodies]
            sample = await closed_loop(len(ids), ctx.cfg.setup_concurrency,
                                       lambda i: ctx.http.delete(zone.agents(ids[i]), headers=zone.headers()),  # noqa: B023
                                       expect=(204,))
            if sample.errors:
                raise SetupError("terminating list filler sessions failed", sample.errors)


async def session_list(ctx: Ctx) -> list[Row]:
    zone = await ctx.zones.new("list")
    await fill_rows(ctx, zone, ctx.p("list_rows"))
    headers = zone.headers()
    page = (await ctx.http.get(zone.agents(), params={"limit": 100}, headers=headers)).json()
    size = len(page.get("items", []))
    targets = {1: [p50(10, "reference 10 ms")], 16: [p50(102, "reference 102 ms")]}
    rows = []
    for concurrency, total in ctx.p("list_requests").items():
        sample = await measure(ctx, concurrency, total,
                               lambda http, i: http.get(zone.agents(), params={"limit": 100}, headers=headers))
        rows.append(latency_row("list", "list, limit 100", concurrency, sample, targets[concurrency],
                                notes=f"{size} items/page", items_per_page=size))
    return rows


# ------------------------------------------------------------------------------------------------
# 4. delegation create

async def delegation_create(ctx: Ctx) -> list[Row]:
    """Resource-scoped edges (res-1, [read], ttl 3600 s) from S sources to S targets of one app.
    Sources never receive an edge (no parent edge to choose), targets never issue one (the cycle
    check stays trivial); S per side keeps the zone within its default capacity of 50."""
    n = ctx.p("delegate_endpoints")
    zone = await ctx.zones.new("delegate")
    app = zone.apps[0]
    bodies = await create_sessions(ctx.cfg, ctx.http, [(zone, app)] * (2 * n))
    ids = [b["agent_session_id"] for b in bodies]
    sources, targets_ = ids[:n], ids[n:]
    headers = zone.headers()

    def call(http: Client, i: int) -> Awaitable[Response]:
        k = abs(i)
        return http.post(f"/zones/{zone.id}/delegations", headers=headers, json={
            "source_session_id": sources[k % n], "target_session_id": targets_[(k // n + k) % n],
            "issuer_application_id": app, "receiver_application_id": app, "resource_id": RESOURCE_ID,
            "scopes": ["read"], "ttl_seconds": 3600})

    targets = {1: [p50(31.5, "1.5× the reference's 21 ms")], 16: [p50_below(300, "ahead of the reference's 300 ms")]}
    rows = []
    for concurrency, total in ctx.p("delegate_requests").items():
        sample = await measure(ctx, concurrency, total, call, expect=(201,))
        rows.append(latency_row("delegate", "delegation create", concurrency, sample, targets[concurrency],
                                notes=f"{n}→{n} sessions"))
    return rows


# ------------------------------------------------------------------------------------------------
# 5. effective authority at the end of a depth-8 chain

async def effective_authority(ctx: Ctx) -> list[Row]:
    zone = await ctx.zones.new("authority")
    app = zone.apps[0]
    headers = zone.headers()
    bodies = await create_sessions(ctx.cfg, ctx.http, [(zone, app)] * 9)
    chain = [b["agent_session_id"] for b in bodies]
    for k in range(8):  # max_hops 9..2, ttl 3600, 3540, ...: every hop narrows its parent
        resp = await ctx.http.post(f"/zones/{zone.id}/delegations", headers=headers, json={
            "source_session_id": chain[k], "target_session_id": chain[k + 1], "issuer_application_id": app,
            "receiver_application_id": app, "resource_id": RESOURCE_ID, "scopes": ["read"],
            "ttl_seconds": 3600 - 60 * k, "constraints": {"max_hops": 9 - k}})
        if resp.status_code != 201:
            raise SetupError(f"chain edge {k + 1} answered {resp.status_code}: {resp.text[:200]}", {describe(resp): 1})
    leaf = chain[-1]
    path = f"/zones/{zone.id}/agents/{leaf}/effective-authority"
    answer = (await ctx.http.get(path, headers=headers)).json()
    targets = {1: [p50(5.5, "reference 5.5 ms"), Target("p95", 10, "p95 ≤ 10 ms (design)")],
               16: [p50(53, "reference 53 ms")]}
    rows = []
    for concurrency, total in ctx.p("authority_requests").items():
        sample = await measure(ctx, concurrency, total, lambda http, i: http.get(path, headers=headers))
        rows.append(latency_row("authority", "effective authority, depth-8 leaf", concurrency, sample,
                                targets[concurrency], notes=f"max_hops {answer.get('effective_max_hops')}",
                                answer={k: answer.get(k) for k in ("effective_scopes", "effective_resources",
                                                                   "effective_max_hops", "effective_ttl_seconds")}))
    return rows


# ------------------------------------------------------------------------------------------------
# 6. impact on a zone of 10,000 edges (graph seeded in Postgres)

async def impact(ctx: Ctx) -> list[Row]:
    if not ctx.cfg.database_url:
        return [Row("impact", "impact, 10k-edge zone", notes="skipped: needs --database-url to seed the graph",
                    verdict="SKIP")]
    from bench.dbseed import seed_graph

    zone = await ctx.zones.new("impact")
    edges, sessions = ctx.p("impact_edges"), ctx.p("impact_sessions")
    t0 = time.monotonic()
    graph = await seed_graph(ctx.cfg.database_url, zone.id, zone.apps[0], RESOURCE_ID, RECORD_ID, edges=edges,
                             sessions=sessions)
    log(ctx.cfg, f"impact: seeded {graph.edges} edges among {graph.sessions} sessions (max depth {graph.max_depth}) "
                 f"in {time.monotonic() - t0:.1f} s")
    near = graph.root_edges
    # Check an answer, and record how much each measured edge reaches.
    reach = []
    for edge_id in near[:20]:
        resp = await ctx.http.get(f"/zones/{zone.id}/delegations/{edge_id}/impact", headers=zone.operator)
        if resp.status_code != 200:
            raise SetupError(f"impact answered {resp.status_code}: {resp.text[:200]}", {describe(resp): 1})
        reach.append(len(resp.json()["affected_edges"]))
    mean_reach = sum(reach) / len(reach)
    rows = []
    name = f"impact, {graph.edges:,}-edge zone"
    for concurrency, total in ctx.p("impact_requests").items():
        sample = await measure(ctx, concurrency, total, lambda http, i: http.get(
            f"/zones/{zone.id}/delegations/{near[i % len(near)]}/impact", headers=zone.operator))
        rows.append(latency_row("impact", name, concurrency, sample,
                                notes=f"root edges, ~{mean_reach:.0f} affected edges each",
                                graph=graph.summary(), affected_edges_per_answer=reach))
    return rows


# ------------------------------------------------------------------------------------------------
# 7. subtree suspend of 1,000 sessions

async def _ids_with_status(ctx: Ctx, zone: BenchZone, status: str) -> list[str]:
    ids, cursor = [], None
    while True:
        params: dict[str, Any] = {"status": status, "limit": 500}
        if cursor:
            params["cursor"] = cursor
        resp = await ctx.http.get(zone.agents(), params=params, headers=zone.headers())
        resp.raise_for_status()
        page = resp.json()
        ids += [item["agent_session_id"] for item in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return ids


async def _count_rows(ctx: Ctx, zone: BenchZone, status: str, db=None) -> int:
    if db is not None:
        cur = await db.execute("SELECT count(*) FROM sessions WHERE zone_id = %s AND status = %s", (zone.id, status))
        return (await cur.fetchone())[0]
    return len(await _ids_with_status(ctx, zone, status))


async def _poll(check: Callable[[], Awaitable[int]], want: int, t0: float, timeout: float,
                interval: float) -> tuple[float | None, int]:
    """Seconds from t0 until check() reaches want (None on timeout), and the last count."""
    last = -1
    while time.perf_counter() - t0 < timeout:
        last = await check()
        if last >= want:
            return time.perf_counter() - t0, last
        await asyncio.sleep(interval)
    return None, last


async def subtree_suspend(ctx: Ctx) -> list[Row]:
    size, fanout = ctx.p("tree_size"), ctx.p("tree_fanout")
    zone = await ctx.zones.new("tree")
    app = zone.apps[0]
    # A complete `fanout`-ary tree, built level by level (node k's parent is node (k-1)//fanout).
    ids: list[str] = []
    level = [0]
    t_build = time.monotonic()
    while level:
        slots = [(zone, app)] * len(level)
        bodies = await create_sessions(
            ctx.cfg, ctx.http, slots,
            parent_id=lambda i, level=level: ids[(level[i] - 1) // fanout] if level[i] else None)  # noqa: B023
        ids += [b["agent_session_id"] for b in bodies]
        nxt = level[-1] + 1
        level = list(range(nxt, min(size, nxt + len(level) * fanout)))
    depth = max(b.get("depth", 0) for b in bodies)
    log(ctx.cfg, f"suspend: built a tree of {len(ids)} sessions (fan-out {fanout}, depth {depth}) "
                 f"in {time.monotonic() - t_build:.1f} s")
    timeout = ctx.p("settle_timeout_s")
    db = temporal = None
    if ctx.cfg.database_url:
        import psycopg

        db = await psycopg.AsyncConnection.connect(ctx.cfg.database_url, autocommit=True)
    if ctx.cfg.temporal_address:
        from temporalio.client import Client

        temporal = await Client.connect(ctx.cfg.temporal_address, namespace=ctx.cfg.temporal_namespace)
    try:
        # The polls run while the PATCH is in flight: rows and workflows may settle before it answers.
        t0 = time.perf_counter()
        rows_task = asyncio.create_task(_poll(lambda: _count_rows(ctx, zone, "suspended", db), len(ids), t0, timeout,
                                              0.02 if db else 0.05))
        wf_task = None
        if temporal is not None:
            query = f'ZoneId = "{zone.id}" AND SessionStatus = "suspended"'

            async def count_workflows() -> int:
                return (await temporal.count_workflows(query)).count

            wf_task = asyncio.create_task(_poll(count_workflows, len(ids), t0, timeout, 0.1))
        resp = await ctx.http.patch(zone.agents(ids[0]) + "/suspend", headers=zone.headers())
        patch_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code != 200:
            for task in (rows_task, wf_task):
                if task is not None:
                    task.cancel()
            raise SetupError(f"suspend answered {resp.status_code}: {resp.text[:200]}", {describe(resp): 1})
        rows_s, rows_n = await rows_task
        wf_s, wf_n = await wf_task if wf_task else (None, None)
    finally:
        if db is not None:
            await db.close()
    name = f"subtree suspend, {len(ids):,} sessions"
    limit = Target("value", 5000, "≤ 5 s (design)")
    out = [value_row("suspend", f"{name}: PATCH answered", patch_ms, notes=f"fan-out {fanout}, depth {depth}"),
           value_row("suspend", f"{name}: all rows suspended", None if rows_s is None else rows_s * 1000, [limit],
                     requests=len(ids), errors=0 if rows_s is not None else len(ids) - max(rows_n, 0),
                     notes=("via Postgres" if db else "via GET ?status=suspended") +
                     ("" if rows_s is not None else f"; only {rows_n} after {timeout:.0f} s"))]
    if temporal is None:
        out.append(Row("suspend", f"{name}: all workflows suspended", verdict="SKIP",
                       notes="skipped: needs --temporal-address (visibility query)"))
    else:
        out.append(value_row("suspend", f"{name}: all workflows suspended", None if wf_s is None else wf_s * 1000,
                             [limit], requests=len(ids), errors=0 if wf_s is not None else len(ids) - max(wf_n, 0),
                             notes="Temporal visibility: SessionStatus" +
                             ("" if wf_s is not None else f"; only {wf_n} after {timeout:.0f} s")))
    return out


# ------------------------------------------------------------------------------------------------
# 8. expiry settlement lag with many live sessions

async def expiry(ctx: Ctx) -> list[Row]:
    live, probes = ctx.p("expiry_live"), ctx.p("expiry_probes")
    lead, window = ctx.p("expiry_lead_s"), ctx.p("expiry_window_s")
    t_live = time.monotonic()
    slots = await ctx.zones.spread("live", live) if live else []
    if slots:
        await create_sessions(ctx.cfg, ctx.http, slots, concurrency=max(16, ctx.cfg.setup_concurrency),
                              progress="expiry: live sessions")
    live_s = time.monotonic() - t_live
    if live:
        log(ctx.cfg, f"expiry: {live} live sessions (ttl 3600 s) in {len({z.id for z, _ in slots})} zone(s) "
                     f"created in {live_s:.1f} s ({live / live_s:.0f}/s)")
    in_stack = None  # live sessions in the whole stack (others' included), when Postgres is at hand
    if ctx.cfg.database_url:
        import psycopg

        async with await psycopg.AsyncConnection.connect(ctx.cfg.database_url) as db:
            cur = await db.execute("SELECT count(*) FROM sessions WHERE status = 'active'")
            in_stack = (await cur.fetchone())[0]
        log(ctx.cfg, f"expiry: {in_stack} active sessions in the stack")

    # Probes: deadlines spread evenly over `window` seconds, the first `lead` seconds from now.
    probe_slots = await ctx.zones.spread("probe", probes)
    start = time.time()
    deadlines = [start + lead + window * i / max(1, probes - 1) for i in range(probes)]
    bodies = await create_sessions(ctx.cfg, ctx.http, probe_slots,
                                   ttl_seconds=lambda i: max(1, round(deadlines[i] - time.time())))
    created_s = time.time() - start
    due = {b["agent_session_id"]: parse_iso(b["started_at"]) + timedelta(seconds=b["ttl_seconds"]) for b in bodies}
    probe_zones = list({z.id: z for z, _ in probe_slots}.values())
    seen: dict[str, tuple[float, str | None]] = {}
    errors: Counter = Counter()
    last_due = max(due.values()).timestamp()
    timeout = ctx.p("settle_timeout_s")

    async def poll_zone(zone: BenchZone) -> None:
        cursor = None
        while True:
            params: dict[str, Any] = {"status": "expired", "limit": 500}
            if cursor:
                params["cursor"] = cursor
            resp = await ctx.http.get(zone.agents(), params=params, headers=zone.headers())
            now = time.time()
            if resp.status_code != 200:
                errors[describe(resp)] += 1
                return
            page = resp.json()
            for item in page["items"]:
                sid = item["agent_session_id"]
                if sid in due and sid not in seen:
                    seen[sid] = (now, item.get("terminated_at"))
            cursor = page.get("next_cursor")
            if not cursor:
                return

    while len(seen) < len(due) and time.time() < last_due + timeout:
        await asyncio.gather(*(poll_zone(z) for z in probe_zones))
        await asyncio.sleep(0.2)

    server_lag, observed_lag = [], []
    for sid, (observed, terminated_at) in seen.items():
        deadline = due[sid].timestamp()
        observed_lag.append((observed - deadline) * 1000)
        if terminated_at:
            server_lag.append((parse_iso(terminated_at).timestamp() - deadline) * 1000)
    missing = len(due) - len(seen)
    name = f"expiry lag, {max(live, in_stack or 0):,} live sessions"
    rows = []
    for label, lags, target in (("deadline → terminated_at", server_lag, True),
                                ("deadline → seen by poll", observed_lag, False)):
        sample = Sample(latencies_ms=lags, errors=Counter({"not settled in time": missing}) if missing else Counter(),
                        wall_s=0)
        row = latency_row("expiry", f"{name} ({label})", None, sample,
                          [Target("p95", 2000, "p95 ≤ 2 s after the deadline (design)")] if target else [],
                          notes=f"{probes} probes over {window:.0f} s" + ("" if target else "; 200 ms poll"),
                          live_sessions_created=live, live_sessions_in_stack=in_stack,
                          live_create_s=round(live_s, 1), probes=probes,
                          probe_create_s=round(created_s, 2), poll_errors=dict(errors))
        row.throughput = row.client_cpu_pct = None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# 9. service sessions heartbeating

async def heartbeat(ctx: Ctx) -> list[Row]:
    count, interval, duration = ctx.p("heartbeat_sessions"), ctx.p("heartbeat_interval"), ctx.p("heartbeat_duration")
    slots = await ctx.zones.spread("svc", count)
    bodies = await create_sessions(ctx.cfg, ctx.http, slots, lifecycle="service", progress="heartbeat: sessions")
    lease_s = None
    first = bodies[0]
    if first.get("heartbeat_deadline_at") and first.get("started_at"):
        lease_s = (parse_iso(first["heartbeat_deadline_at"]) - parse_iso(first["started_at"])).total_seconds()
    log(ctx.cfg, f"heartbeat: {count} service sessions (lease {lease_s} s), heartbeating every {interval:g} s "
                 f"for {duration:g} s")
    sample = Sample()
    lost: set[str] = set()
    rng = random.Random(7)

    async with ctx.client(min(count, 256)) as http:
        loop = asyncio.get_running_loop()
        begin = loop.time() + 0.5
        end = begin + duration

        async def beat(k: int) -> None:
            zone, _ = slots[k]
            sid, gen = bodies[k]["agent_session_id"], bodies[k].get("lease_generation")
            url, headers = zone.agents(sid) + "/heartbeat", zone.headers(slots[k][1])
            payload = {"status": "healthy", "lease_generation": gen}
            due = begin + rng.random() * interval
            while due < end:
                await asyncio.sleep(max(0.0, due - loop.time()))
                t0 = time.perf_counter()
                try:
                    resp = await http.post(url, json=payload, headers=headers)
                except TRANSPORT_ERRORS as exc:
                    sample.errors[f"exception {type(exc).__name__}"] += 1
                else:
                    if resp.status_code == 200:
                        sample.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    else:
                        kind = describe(resp)
                        sample.errors[kind] += 1
                        if "lease" in kind or "not_live" in kind:
                            lost.add(sid)
                due += interval

        sample.load_start = os.getloadavg()[0]
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(beat(k) for k in range(count)))
        sample.wall_s, sample.cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
        sample.load_end = os.getloadavg()[0]

    # False lease losses: a session that heartbeated on time but is no longer active. (Sessions the
    # harness never heartbeated, e.g. one created by a create that answered 503, are not counted.)
    zones = list({z.id: z for z, _ in slots}.values())
    ours = {b["agent_session_id"] for b in bodies}
    ended = [sid for z in zones for status in ("suspended", "expired", "terminated")
             for sid in await _ids_with_status(ctx, z, status)]
    suspended = len([sid for sid in ended if sid in ours])
    others = len([sid for sid in ended if sid not in ours])
    losses = len(lost | {sid for sid in ended if sid in ours})
    row = latency_row("heartbeat", f"heartbeat, {count:,} services every {interval:g} s for {duration:g} s", count,
                      sample, [Target("lease_losses", 0, "0 lease losses")],
                      notes=(f"offered {count / interval:.0f}/s; " + (f"lease {lease_s:g} s; " if lease_s else "")
                             + f"{losses} lease losses"), offered_per_s=count / interval,
                      lease_losses=losses, not_active=suspended, not_heartbeated_sessions_ended=others,
                      lease_seconds=lease_s,
                      interval_s=interval, duration_s=duration)
    # Leave no lapsing leases behind: end the service sessions (their lease generation fences it).
    await closed_loop(count, ctx.cfg.setup_concurrency, lambda k: ctx.http.request(
        "DELETE", slots[k][0].agents(bodies[k]["agent_session_id"]), headers=slots[k][0].headers(slots[k][1]),
        json={"lease_generation": bodies[k].get("lease_generation")}), expect=(204, 404))
    return [row]


# ------------------------------------------------------------------------------------------------
# 10. RSS of the stack's processes

async def rss(ctx: Ctx) -> list[Row]:
    from bench.procs import stack_memory

    found = stack_memory(ctx.cfg.base_url, ctx.cfg.database_url, ctx.cfg.temporal_address)
    rows = []
    for role in ("api", "worker", "temporal", "postgres"):
        info = found.get(role)
        if info is None:
            rows.append(Row("rss", f"RSS {role}", verdict="SKIP", notes="skipped: process not found"))
            continue
        rows.append(Row("rss", f"RSS {role}", requests=info["processes"],
                        notes=f"RSS {info['rss_mb']:.0f} MB, PSS {info['pss_mb']:.0f} MB, {info['processes']} proc "
                              f"({info['how']})", extra=info))
    return rows


# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# 11. Temporal follows Postgres: commit-to-signal lag, convergence after a burst, sustained rate


async def _backlog(ctx: Ctx) -> int:
    """Notices waiting in the workflow outbox: from Postgres when given (/ready has its own rate
    limit)."""
    if ctx.cfg.database_url:
        from storage import notice_dispatch
        from storage.db import Database

        db = Database(ctx.cfg.database_url, max_size=1)
        await db.open()
        try:
            return int((await notice_dispatch.backlog(db))["backlog"])
        finally:
            await db.close()
    await asyncio.sleep(0.5)  # within READY_RATE_LIMIT_PER_MIN
    return int((await ctx.http.get("/ready")).json().get("workflow_outbox", {}).get("backlog", -1))


async def _start_lags(temporal, zone: BenchZone, answered: dict[str, float]) -> list[float]:
    """For each session: its workflow's start time minus the moment its create was answered (ms).
    (Same machine, same clock: the lag from commit to the workflow's first signal.)"""
    from temporalio.service import RPCError

    lags: list[float] = []
    sem = asyncio.Semaphore(16)

    async def one(sid: str, at: float) -> None:
        async with sem:
            for _ in range(200):
                try:
                    desc = await temporal.get_workflow_handle(f"session/{zone.id}/{sid}").describe()
                    lags.append((desc.start_time.timestamp() - at) * 1000)
                    return
                except RPCError:
                    await asyncio.sleep(0.1)
    await asyncio.gather(*(one(sid, at) for sid, at in answered.items()))
    return lags


async def follow(ctx: Ctx) -> list[Row]:
    if not ctx.cfg.temporal_address:
        return [Row("follow", "Temporal follows", verdict="SKIP", notes="skipped: needs --temporal-address")]
    from temporalio.client import Client as TemporalClient

    temporal = await TemporalClient.connect(ctx.cfg.temporal_address, namespace=ctx.cfg.temporal_namespace)
    zone = await ctx.zones.new("follow")
    app = zone.apps[0]
    out: list[Row] = []
    deadline = time.monotonic() + 120
    while await _backlog(ctx) > 0 and time.monotonic() < deadline:  # start from an idle outbox
        await asyncio.sleep(0.5)

    async def create(http: Client, answered: dict[str, float]) -> Response:
        resp = await http.post(zone.agents(), json={"application_id": app, "subject_session_id": RECORD_ID},
                               headers=zone.headers(app))
        if resp.status_code == 201:
            answered[resp.json()["agent_session_id"]] = time.time()
        return resp

    # Idle: one create at a time, 100 ms apart.
    idle: dict[str, float] = {}
    async with ctx.client(1) as http:
        for _ in range(ctx.p("follow_idle")):
            await create(http, idle)
            await asyncio.sleep(0.1)
    lags = sorted(await _start_lags(temporal, zone, idle))
    out.append(value_row("follow", "commit-to-signal lag at idle, p50", statistics.median(lags), requests=len(lags)))
    out.append(value_row("follow", "commit-to-signal lag at idle, p95", lags[int(len(lags) * 0.95) - 1],
                         requests=len(lags)))

    # A burst: n creates at concurrency 16; then every workflow running with its row's state.
    burst: dict[str, float] = {}
    n = ctx.p("follow_burst")
    t0 = time.monotonic()
    async with ctx.client(16) as http:
        await closed_loop(n, 16, lambda i: create(http, burst), expect=(201,))
    answered_s = time.monotonic() - t0
    while await _backlog(ctx) > 0 and time.monotonic() - t0 < 300:
        await asyncio.sleep(0.1)
    query = f'ZoneId = "{zone.id}" AND ExecutionStatus = "Running" AND SessionStatus = "active"'
    while (await temporal.count_workflows(query)).count < len(burst) + len(idle) and time.monotonic() - t0 < 300:
        await asyncio.sleep(0.1)
    converged_s = time.monotonic() - t0
    lags = sorted(await _start_lags(temporal, zone, burst))
    out.append(value_row("follow", f"burst of {n} creates at c16: answered", answered_s * 1000, requests=n))
    out.append(value_row("follow", f"burst of {n} creates at c16: every workflow running with its row's state",
                         converged_s * 1000, [Target("value", 10000, "≤ 10 s after the burst began")], requests=n))
    out.append(value_row("follow", "commit-to-signal lag under the burst, p50", statistics.median(lags),
                         requests=len(lags)))
    out.append(value_row("follow", "commit-to-signal lag under the burst, p95", lags[int(len(lags) * 0.95) - 1],
                         requests=len(lags)))

    # Sustained: creates at a fixed rate; the backlog bounded means it ends near zero.
    for rate in ctx.p("follow_rates"):
        seconds = ctx.p("follow_seconds")
        answered: dict[str, float] = {}
        async with ctx.client(16) as http:
            started = time.monotonic()
            tasks = []
            for i in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(create(http, answered)))
            await asyncio.gather(*tasks)
        backlog = await _backlog(ctx)
        out.append(value_row("follow", f"sustained {rate}/s creates for {seconds} s: backlog at the end (rows)",
                             float(backlog), requests=len(answered),
                             notes="bounded" if backlog < rate else "growing"))
        drain_deadline = time.monotonic() + 120
        while await _backlog(ctx) > 0 and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.5)
    return out


from bench.follow_curve import follow_curve  # noqa: E402 — it imports this module's helpers lazily
from bench.feed_latency import feed_latency  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    run: Callable[[Ctx], Awaitable[list[Row]]]


# ------------------------------------------------------------------------------------------------
# 14. bulk revocation of 1,000 matched edges with their cascades


async def _bulk_zone(ctx: Ctx, n: int, sources: int) -> BenchZone:
    """S sources, N targets, N leaves: source[i % S] -(read, write; max_hops 2)-> target[i]
    -(read)-> leaf[i]. A revoke of scope `write` matches the N first edges, takes the N second ones
    with them and ends the 2N targets and leaves."""
    zone = await ctx.zones.new("bulk")
    app = zone.apps[0]
    ids = [b["agent_session_id"] for b in await create_sessions(ctx.cfg, ctx.http, [(zone, app)] * (sources + 2 * n))]
    src, targets, leaves = ids[:sources], ids[sources:sources + n], ids[sources + n:]
    headers = zone.headers()

    def edge(source: str, target: str, scopes: list[str], ttl: int, hops: int) -> Callable[[], Awaitable[Response]]:
        return lambda: ctx.http.post(f"/zones/{zone.id}/delegations", headers=headers, json={
            "source_session_id": source, "target_session_id": target, "issuer_application_id": app,
            "receiver_application_id": app, "resource_id": RESOURCE_ID, "scopes": scopes, "ttl_seconds": ttl,
            "constraints": {"max_hops": hops}})

    for calls in ([edge(src[i % sources], targets[i], ["read", "write"], 3600, 2) for i in range(n)],
                  [edge(targets[i], leaves[i], ["read"], 3000, 1) for i in range(n)]):
        sample = await closed_loop(len(calls), ctx.cfg.setup_concurrency, lambda k: calls[k](),  # noqa: B023
                                   expect=(201,))
        if sample.errors:
            raise SetupError(f"bulk seed edges: {', '.join(sample.errors)}", dict(sample.errors))
    return zone


async def _drained(ctx: Ctx, timeout: float, t0: float | None = None) -> float | None:
    """Seconds from t0 (now) until the workflow outbox is empty; None after `timeout`."""
    t0 = time.perf_counter() if t0 is None else t0
    while time.perf_counter() - t0 < timeout:
        if await _backlog(ctx) <= 0:
            return time.perf_counter() - t0
        await asyncio.sleep(0.2)
    return None


async def bulk_revoke(ctx: Ctx) -> list[Row]:
    n, sources, repeats = ctx.p("bulk_edges"), ctx.p("bulk_sources"), ctx.p("bulk_repeats")
    if ctx.cfg.zone_capacity < sources + 2 * n:
        return [Row("bulk_revoke", "bulk revoke", notes=f"skipped: needs --zone-capacity >= {sources + 2 * n}",
                    verdict="SKIP")]
    previews, revokes, drains, agree = [], [], [], True
    for _ in range(repeats):
        zone = await _bulk_zone(ctx, n, sources)
        await _drained(ctx, 4 * ctx.p("settle_timeout_s"))  # the seeding's own notices first
        url = f"/zones/{zone.id}/delegations/bulk-revoke"
        t0 = time.perf_counter()
        preview = await ctx.http.post(url, headers=zone.operator, json={"filter": {"scope": "write"}, "dry_run": True})
        previews.append(1000 * (time.perf_counter() - t0))
        if preview.status_code != 200:
            raise SetupError(f"bulk preview answered {preview.status_code}: {preview.text[:200]}",
                             {describe(preview): 1})
        planned = preview.json()
        t0 = time.perf_counter()
        done = await ctx.http.post(url, headers={**zone.operator, "Idempotency-Key": f"bench-{zone.id}"},
                                   json={"filter": {"scope": "write"}, "expected_epoch": planned["epoch"]})
        revokes.append(1000 * (time.perf_counter() - t0))
        if done.status_code != 200:
            raise SetupError(f"bulk revoke answered {done.status_code}: {done.text[:200]}", {describe(done): 1})
        answer = done.json()
        agree &= all(answer[k] == planned[k] for k in ("matched_edges", "downstream_edges", "terminated_sessions"))
        drained = await _drained(ctx, ctx.p("settle_timeout_s"), t0)
        drains.append(None if drained is None else 1000 * drained)
    counts = planned["counts"]
    notes = (f"{counts['matched']} matched + {counts['downstream']} downstream edges, "
             f"{counts['terminated_sessions']} sessions ended; preview == revocation: {agree}")
    return [
        value_row("bulk_revoke", f"bulk revoke preview, {n:,} edges", statistics.median(previews), concurrency=1,
                  requests=repeats, notes=notes, all_ms=[round(v, 1) for v in previews]),
        value_row("bulk_revoke", f"bulk revoke, {n:,} edges + cascade", statistics.median(revokes),
                  [Target("p50", 1000, "≤ 1 s at c1")], concurrency=1, requests=repeats, notes=notes,
                  errors=0 if agree else 1, all_ms=[round(v, 1) for v in revokes]),
        value_row("bulk_revoke", "workflow outbox drained after the revoke", max((d or 1e9) for d in drains),
                  concurrency=1, requests=repeats, notes="revoke request to empty outbox (empty before)",
                  all_ms=drains),
    ]


SCENARIOS: list[Scenario] = [
    Scenario("create", "1. session create", session_create),
    Scenario("get", "2. session GET", session_get),
    Scenario("list", "3. list, limit 100", session_list),
    Scenario("delegate", "4. delegation create", delegation_create),
    Scenario("authority", "5. effective authority, depth-8 chain", effective_authority),
    Scenario("impact", "6. impact on a 10,000-edge zone", impact),
    Scenario("suspend", "7. subtree suspend of 1,000 sessions", subtree_suspend),
    Scenario("expiry", "8. expiry settlement lag with 10,000 live sessions", expiry),
    Scenario("heartbeat", "9. service heartbeats", heartbeat),
    Scenario("rss", "10. RSS of api, worker, Temporal, Postgres", rss),
    Scenario("follow", "11. Temporal follows: signal lag, burst convergence, sustained rate", follow),
    Scenario("follow_curve", "12. follow curve: lag, backlog, drain and cost per session at offered rates",
             lambda ctx: follow_curve(ctx)),
    Scenario("feed_latency", "13. event feed: command answer to its event on an SSE stream", feed_latency),
    Scenario("bulk_revoke", "14. bulk revocation of 1,000 edges with their cascades", bulk_revoke),
]
