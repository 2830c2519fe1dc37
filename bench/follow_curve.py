"""Scenario 12, `follow_curve`: how closely the workflows follow the commands at offered rates.

For each offered rate (creates per second) and for a mixed load (creates, suspends, resumes,
deletes, delegations and revokes), `follow_curve_seconds` of open-loop load, then:
- follow lag p50/p95/max: from a command's request to the workflow task that applied its notice
  (the first WorkflowTaskCompleted after the notice's signal, or after the start that carried it,
  in the workflow's history), over a
  sample of the commands (a create's, or one command's on a session no other command touched);
- the outbox backlog when the load stops and the time it takes to drain;
- per followed session: CPU seconds of each process of the stack and bytes it wrote (its
  /proc/<pid>/io write_bytes), and the bytes the block devices took (/proc/diskstats after a sync).

The Temporal store is whatever the stack has; `python -m bench.temporal_seed` fills it fast.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from bench.core import RECORD_ID, RESOURCE_ID, Row, Target, log, value_row

MIX = (("create", 40), ("suspend", 15), ("resume", 15), ("delete", 10), ("delegate", 10), ("revoke", 10))


def _disk_written() -> int:
    """Bytes written to the block devices so far (whole machine; partitions left out)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            name = parts[2]
            if name.startswith(("loop", "ram", "dm-", "sr")) or name[-1].isdigit() and not name.startswith("nvme"):
                continue
            if name.startswith("nvme") and "p" in name[4:]:
                continue
            total += int(parts[9]) * 512
    return total


def _usage(procs: dict[str, list]) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    for role, ps in procs.items():
        cpu, written = 0.0, 0
        for p in ps:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
                written += p.io_counters().write_bytes
            except Exception:  # noqa: BLE001 — a process gone or not ours to read
                continue
        out[role] = (cpu, written)
    return out


async def _applied_lags(temporal, sampled: list[tuple[str, float]]) -> list[float]:
    """ms from each request to the workflow task that applied the first notice after it: one that
    came by signal, or in the input of the start (a new workflow's first notices)."""
    lags: list[float] = []
    sem = asyncio.Semaphore(16)

    async def one(workflow_id: str, sent: float) -> None:
        async with sem:
            try:
                history = await temporal.get_workflow_handle(workflow_id).fetch_history()
            except Exception:  # noqa: BLE001 — never started: counted as missing
                return
            signalled = False
            for e in history.events:
                at = e.event_time.ToDatetime().timestamp() if hasattr(e.event_time, "ToDatetime") else 0.0
                if at >= sent - 0.001 and (e.HasField("workflow_execution_signaled_event_attributes")
                                           or e.HasField("workflow_execution_started_event_attributes")):
                    signalled = True
                elif signalled and e.HasField("workflow_task_completed_event_attributes"):
                    lags.append(max(0.0, (at - sent) * 1000))
                    return
    await asyncio.gather(*(one(w, s) for w, s in sampled))
    return sorted(lags)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * q))]


async def follow_curve(ctx) -> list[Row]:
    from bench.procs import stack_processes
    from bench.scenarios import _backlog

    if not ctx.cfg.temporal_address:
        return [Row("follow_curve", "follow curve", verdict="SKIP", notes="skipped: needs --temporal-address")]
    from temporalio.client import Client as TemporalClient

    temporal = await TemporalClient.connect(ctx.cfg.temporal_address, namespace=ctx.cfg.temporal_namespace)
    store = await temporal.count_workflows("")
    running = await temporal.count_workflows('ExecutionStatus = "Running"')
    store_note = f"Temporal store: {store.count} workflows, {running.count} running"
    log(ctx.cfg, f"follow_curve: {store_note}")
    seconds = ctx.p("follow_curve_seconds")
    loads = ([("creates", r) for r in ctx.p("follow_curve_rates")]
             + [("mix", r) for r in ctx.p("follow_curve_mix_rates")])
    out: list[Row] = []
    for kind, rate in loads:
        out += await _one_load(ctx, temporal, stack_processes, _backlog, kind, rate, seconds, store_note)
    return out


async def _one_load(ctx, temporal, stack_processes, backlog_of, kind: str, rate: int, seconds: float,
                    store_note: str) -> list[Row]:
    zone = await ctx.zones.new(f"curve-{kind}-{rate}")
    app = zone.apps[0]
    headers = zone.headers(app)
    deadline = time.monotonic() + 300
    while await backlog_of(ctx) > 0 and time.monotonic() < deadline:  # from an idle outbox
        await asyncio.sleep(0.5)
    rng = random.Random(rate)
    live: list[str] = []  # sessions created in this load and not deleted
    suspended: list[str] = []
    edges: list[str] = []
    touched: dict[str, int] = {}  # workflow id -> commands on it
    sent_at: dict[str, float] = {}  # workflow id -> its (last) command's send time
    errors: dict[str, int] = {}

    def wid(session_id: str) -> str:
        return f"session/{zone.id}/{session_id}"

    async def command(http) -> None:
        op = "create"
        if kind == "mix" and len(live) > 20:
            op = rng.choices([m for m, _ in MIX], [w for _, w in MIX])[0]
            if op == "resume" and not suspended or op == "revoke" and not edges:
                op = "create"
        sent = time.time()
        target = None
        if op == "create":
            resp = await http.post(zone.agents(), json={"application_id": app, "subject_session_id": RECORD_ID},
                                   headers=headers)
            if resp.status_code == 201:
                target = resp.json()["agent_session_id"]
                live.append(target)
        elif op in ("suspend", "delete"):
            target = live.pop(rng.randrange(len(live)))
            if op == "suspend":
                resp = await http.patch(zone.agents(target) + "/suspend", headers=headers)
                suspended.append(target)
            else:
                resp = await http.delete(zone.agents(target), headers=headers)
        elif op == "resume":
            target = suspended.pop(rng.randrange(len(suspended)))
            resp = await http.patch(zone.agents(target) + "/resume", headers=headers)
            live.append(target)
        elif op == "delegate":
            source, to = rng.sample(live, 2)
            resp = await http.post(f"/zones/{zone.id}/delegations", headers=zone.headers(), json={
                "source_session_id": source, "target_session_id": to, "issuer_application_id": app,
                "receiver_application_id": app, "resource_id": RESOURCE_ID, "scopes": ["read"], "ttl_seconds": 3600})
            if resp.status_code == 201:
                edges.append(resp.json().get("edge_id") or resp.json().get("id"))
        else:
            resp = await http.patch(f"/zones/{zone.id}/delegations/{edges.pop(rng.randrange(len(edges)))}/revoke",
                                    headers=zone.headers())
        if resp.status_code >= 300:
            key = f"{op} {resp.status_code}"
            errors[key] = errors.get(key, 0) + 1
        elif target is not None:  # creates, suspends, resumes, deletes notify the session's workflow
            touched[wid(target)] = touched.get(wid(target), 0) + 1
            sent_at[wid(target)] = sent

    procs = {role: found for role, (found, _) in stack_processes(ctx.cfg.base_url, ctx.cfg.database_url,
                                                                  ctx.cfg.temporal_address).items()}
    os.sync()
    before, disk_before, t0 = _usage(procs), _disk_written(), time.monotonic()
    async with ctx.client(64) as http:
        tasks = []
        total = int(rate * seconds)
        for i in range(total):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(command(http)))
            if len(tasks) >= 256:
                tasks = [t for t in tasks if not t.done()]
        await asyncio.gather(*tasks)
    offered_s = time.monotonic() - t0
    backlog_end = await backlog_of(ctx)
    while await backlog_of(ctx) > 0 and time.monotonic() - t0 < offered_s + 600:
        await asyncio.sleep(0.25)
    drained_s = time.monotonic() - t0 - offered_s
    # Let the last workflow tasks complete before counting what they cost.
    await asyncio.sleep(2)
    os.sync()
    after, disk_after = _usage(procs), _disk_written()
    followed = len(touched)
    singles = [(w, sent_at[w]) for w, n in touched.items() if n == 1]
    sample = rng.sample(singles, min(len(singles), ctx.p("follow_curve_lag_sample")))
    lags = await _applied_lags(temporal, sample)
    label = f"{kind} {rate}/s for {seconds:g} s"
    per = max(1, followed)
    cost = {role: {"cpu_ms_per_session": round((after[role][0] - before[role][0]) * 1000 / per, 2),
                   "kb_written_per_session": round((after[role][1] - before[role][1]) / 1024 / per, 1)}
            for role in after}
    disk_kb = round((disk_after - disk_before) / 1024 / per, 1)
    common = {"store": store_note, "followed_sessions": followed, "commands": sum(touched.values()),
              "command_errors": errors, "cost": cost, "disk_kb_per_session": disk_kb, "offered_s": round(offered_s, 1)}
    log(ctx.cfg, f"follow_curve {label}: lag p95 {_pct(lags, 0.95)} ms, backlog {backlog_end}, drained in "
                 f"{drained_s:.1f} s, disk {disk_kb} KB/session, {cost}")
    notes = f"{followed} sessions followed" + (f"; {sum(errors.values())} errors" if errors else "")
    return [
        value_row("follow_curve", f"{label}: follow lag p50", _pct(lags, 0.5), requests=len(lags), **common),
        value_row("follow_curve", f"{label}: follow lag p95", _pct(lags, 0.95),
                  [Target("value", 5000, "≤ 5 s")] if rate <= 150 else [], requests=len(lags), notes=notes),
        value_row("follow_curve", f"{label}: follow lag max", lags[-1] if lags else None, requests=len(lags)),
        value_row("follow_curve", f"{label}: backlog when the load stopped (rows)", float(backlog_end)),
        value_row("follow_curve", f"{label}: drained after the load stopped", drained_s * 1000,
                  [Target("value", 10000, "≤ 10 s")] if rate <= 150 else []),
        value_row("follow_curve", f"{label}: disk written per followed session (KB)", disk_kb,
                  [Target("value", 100, "≤ 100 KB")], notes=", ".join(
                      f"{r} {c['cpu_ms_per_session']} ms CPU / {c['kb_written_per_session']} KB"
                      for r, c in cost.items())),
    ]
