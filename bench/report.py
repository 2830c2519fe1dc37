"""The printed table and the JSON file (machine, commit, date, rows)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.core import Row

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model or platform.processor() or None,
            "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None, "platform": platform.platform(),
            "python": platform.python_version(), "hostname": platform.node()}


def git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "branch": run("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


COLUMNS = ["scenario", "conc", "requests", "p50 ms", "p95 ms", "p99 ms", "req/s", "errors", "client cpu",
           "target", "result", "notes"]


def table(rows: list[Row]) -> str:
    cells = []
    for r in rows:
        cells.append([
            r.name, "-" if r.concurrency is None else str(r.concurrency), str(r.requests) if r.requests else "-",
            _ms(r.p50), _ms(r.p95), _ms(r.p99), "-" if r.throughput is None else f"{r.throughput:.0f}",
            str(r.errors), "-" if r.client_cpu_pct is None else f"{r.client_cpu_pct:.0f}%",
            "; ".join(t.label for t in r.targets) or "-", r.verdict, r.notes or ""])
    widths = [max(len(COLUMNS[i]), *(len(c[i]) for c in cells)) if cells else len(COLUMNS[i])
              for i in range(len(COLUMNS))]
    right = {1, 2, 3, 4, 5, 6, 7, 8}

    def fmt(row: list[str]) -> str:
        return " | ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()

    lines = [fmt(COLUMNS), "-+-".join("-" * w for w in widths)]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)


def default_out(meta: dict[str, Any], quick: bool) -> Path:
    commit = (meta["git"].get("commit") or "nogit")[:7]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return RESULTS_DIR / f"{stamp}-{commit}{'-quick' if quick else ''}.json"


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
