"""Find the stack's processes (psutil) and sum their memory per role.

Processes are anchored on the ports the harness was given, so other stacks on the same machine
(test runs, other engineers' `make dev`) are not counted:
- api: the process listening on the base URL's port (its command line must be `python -m api`
  or uvicorn's);
- worker: `worker.py` processes that are siblings of the API (same parent: `make dev`);
- temporal: the process listening on --temporal-address's port (`temporal server start-dev`);
- postgres: the postmaster listening on --database-url's port and all its children.
Without --temporal-address / --database-url, those roles fall back to a command-line match over the
whole machine (noted as such: it may include other stacks). RSS double-counts shared pages (Postgres shared
buffers); PSS splits them between the processes sharing them.
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit


def _listener(port: int | None):
    import psutil

    if not port:
        return None
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                return psutil.Process(c.pid)
            except psutil.Error:
                return None
    return None


def _cmd(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:
        return []


def _is_api(cmd: list[str]) -> bool:
    joined = " ".join(cmd)
    return "-m api" in joined or "uvicorn" in joined


def _is_worker(cmd: list[str]) -> bool:
    return any(a.endswith("worker.py") for a in cmd)


def _is_temporal(cmd: list[str]) -> bool:
    return bool(cmd) and cmd[0].endswith("temporal") and "start-dev" in cmd


def _is_postgres(proc) -> bool:
    try:
        return proc.name().startswith("postgres")
    except Exception:
        return False


def _memory(procs: list, how: str) -> dict[str, Any]:
    rss = pss = 0
    pids = []
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
            pids.append(p.pid)
        except Exception:
            try:
                rss += p.memory_info().rss
                pss += p.memory_info().rss
                pids.append(p.pid)
            except Exception:
                continue
    return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "processes": len(pids), "pids": pids, "how": how}


def _port(url: str | None, default: int | None = None) -> int | None:
    if not url:
        return default
    if "://" not in url:
        url = "tcp://" + url
    try:
        return urlsplit(url).port or default
    except ValueError:
        return default


def _is_dispatcher(cmd: list[str]) -> bool:
    return "-m notices" in " ".join(cmd)


def stack_processes(base_url: str, database_url: str | None, temporal_address: str | None
                    ) -> dict[str, tuple[list, str]]:
    """The processes of each role found by their anchors, and how each role was found."""
    import psutil

    found: dict[str, tuple[list, str]] = {}
    api = _listener(_port(base_url, 80))
    with contextlib.suppress(psutil.Error):
        # Several API processes (API_PROCESSES) listen as multiprocessing children of `python -m api`.
        if api is not None and not _is_api(_cmd(api)) and api.parent() is not None and _is_api(_cmd(api.parent())):
            api = api.parent()
    if api is not None and _is_api(_cmd(api)):
        try:
            found["api"] = ([api, *api.children(recursive=True)], f"listening on :{_port(base_url, 80)}")
            parent = api.parent()
            siblings = parent.children() if parent else []
        except psutil.Error:
            siblings = []
        for role, match in (("worker", _is_worker), ("dispatcher", _is_dispatcher)):
            procs = [c for c in siblings if match(_cmd(c))]
            if procs:
                found[role] = (procs, "sibling of the API")
    tmp = _listener(_port(temporal_address))
    if tmp is not None and _is_temporal(_cmd(tmp)):
        found["temporal"] = ([tmp], f"listening on :{_port(temporal_address)}")
    pg = _listener(_port(database_url, 5432) if database_url else None)
    if pg is not None and _is_postgres(pg):
        found["postgres"] = ([pg, *pg.children(recursive=True)], f"postmaster on :{_port(database_url)}")
    return found


def stack_memory(base_url: str, database_url: str | None, temporal_address: str | None) -> dict[str, dict[str, Any]]:
    import psutil

    found: dict[str, dict[str, Any]] = {
        role: _memory(procs, how)
        for role, (procs, how) in stack_processes(base_url, database_url, temporal_address).items()
        if role != "dispatcher"}

    # Fallback, only for roles the harness was given no anchor for (no --temporal-address, no
    # --database-url): command-line matches over the whole machine.
    matchers = {"temporal": (temporal_address, lambda p: _is_temporal(_cmd(p))),
                "postgres": (database_url, _is_postgres)}
    missing = [role for role, (anchor, _) in matchers.items() if role not in found and not anchor]
    if missing:
        procs = list(psutil.process_iter())
        for role in missing:
            hits = [p for p in procs if matchers[role][1](p)]
            if hits:
                found[role] = _memory(hits, "command-line match over the whole machine; may include other stacks")
    return found
