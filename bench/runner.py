"""Run the selected scenarios against a running API, print the table, write the JSON."""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.httpclient import LIBRARY, TRANSPORT_ERRORS
from bench.core import PARAMS, Config, Row, SetupError, Zones, client, hints_for, log
from bench.report import default_out, git, machine, table, write_json
from bench.scenarios import SCENARIOS, Ctx

# Parameters whose full-mode value the design's targets are stated for.
SIZED = {"expiry_live": "live sessions (expiry)", "expiry_probes": "expiry probes",
         "heartbeat_sessions": "heartbeating services", "heartbeat_duration": "heartbeat seconds",
         "tree_size": "tree size (suspend)", "impact_edges": "impact edges"}


def select(names: list[str]) -> list:
    if not names:
        return list(SCENARIOS)
    by_key = {s.key: s for s in SCENARIOS}
    by_number = {str(i + 1): s for i, s in enumerate(SCENARIOS)}
    chosen = []
    for name in names:
        s = by_key.get(name) or by_number.get(name)
        if s is None:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(by_key)} (or 1-{len(SCENARIOS)})")
        if s not in chosen:
            chosen.append(s)
    return [s for s in SCENARIOS if s in chosen]


async def run_bench(cfg: Config) -> dict[str, Any]:
    scenarios = select(cfg.scenarios)
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "git": git(), "base_url": cfg.base_url, "mode": "quick" if cfg.quick else "full",
        "client": {"library": LIBRARY, "http": "HTTP/1.1 keep-alive",
                   "connections": "concurrency + 4 per measured run", "process": os.getpid()},
        "database_url_given": bool(cfg.database_url), "temporal_address": cfg.temporal_address,
        "zone_capacity": cfg.zone_capacity, "app_capacity": cfg.app_capacity,
        "params": {k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None
                   else PARAMS["quick" if cfg.quick else "full"][k] for k in PARAMS["full"]},
        "load1_start": os.getloadavg()[0],
    }
    meta["params"] = {k: (str(v) if isinstance(v, dict) else v) for k, v in meta["params"].items()}
    notes = list(cfg.notes)
    if not cfg.quick:
        for name, what in SIZED.items():
            value, full = cfg.param(name), PARAMS["full"][name]
            if value < full:
                notes.append(f"reduced: {what} {value:g} instead of {full:g}")
    document: dict[str, Any] = {"meta": meta, "notes": notes, "scenarios": [], "hints": []}
    t_run = time.monotonic()

    async with client(cfg.setup_concurrency, cfg.base_url) as http:
        try:
            ready = await http.get("/ready")
            meta["ready"] = ready.status_code
        except TRANSPORT_ERRORS as exc:
            raise SystemExit(f"cannot reach {cfg.base_url}: {exc!r}") from exc
        ctx = Ctx(cfg, http, Zones(cfg, http))
        all_rows: list[Row] = []
        for scenario in scenarios:
            log(cfg, f"{scenario.title}: starting")
            t0 = time.monotonic()
            entry: dict[str, Any] = {"name": scenario.key, "title": scenario.title}
            try:
                rows = await scenario.run(ctx)
                skipped = all(r.verdict == "SKIP" for r in rows)
                entry["status"] = "skipped" if skipped else "ok"
            except SetupError as exc:
                rows = [Row(scenario.key, scenario.title, errors=1, verdict="FAIL", notes=f"setup failed: {exc}"[:160],
                            error_kinds=exc.kinds)]
                entry.update(status="failed", reason=str(exc))
                document["hints"] += [h for h in exc.hints if h not in document["hints"]]
            except Exception as exc:  # a broken scenario must not hide the others' results
                traceback.print_exc(file=sys.stderr)
                rows = [Row(scenario.key, scenario.title, errors=1, verdict="FAIL", notes=f"failed: {exc!r}"[:160])]
                entry.update(status="failed", reason=repr(exc))
            for r in rows:
                document["hints"] += [h for h in hints_for(r.error_kinds) if h not in document["hints"]]
            entry["seconds"] = round(time.monotonic() - t0, 1)
            entry["rows"] = [r.as_dict() for r in rows]
            entry["errors"] = sum(r.errors for r in rows)
            document["scenarios"].append(entry)
            all_rows += rows
            log(cfg, f"{scenario.title}: {entry['status']} in {entry['seconds']} s")

    meta["load1_end"] = os.getloadavg()[0]
    meta["seconds"] = round(time.monotonic() - t_run, 1)
    text = table(all_rows)
    document["table"] = text.splitlines()
    out = Path(cfg.out) if cfg.out else default_out(meta, cfg.quick)
    if out.is_dir() or (cfg.out and cfg.out.endswith("/")):
        out = out / default_out(meta, cfg.quick).name
    write_json(out, document)
    document["path"] = str(out)

    m = meta["machine"]
    print(text)
    print()
    print(f"machine: {m['cpu_count']} × {m['cpu_model']}, {m['memory_gb']} GB; load average (1 min) "
          f"{meta['load1_start']:.1f} at start, {meta['load1_end']:.1f} at end (other jobs share this machine); "
          f"commit {(meta['git']['commit'] or '?')[:10]}{' (dirty)' if meta['git']['dirty'] else ''}")
    print(f"client: {LIBRARY}, HTTP/1.1 keep-alive, one pooled connection per concurrent request; "
          "'client cpu' is the harness's own CPU time (getrusage) over the run's wall time, in % of one core")
    for note in notes:
        print(f"note: {note}")
    for hint in document["hints"]:
        print(f"HINT: {hint}")
    print(f"results: {out}")
    return document
