"""The API's process model: `python -m api` runs `run_api()`.

With more than one process a small supervisor runs that many uvicorn servers, each listening on
its own SO_REUSEPORT socket on PORT: the kernel spreads new connections across them by a hash of
the connection (on one shared socket the least busy process won the accept race and took 14 of 16
keep-alive connections; with few long-lived connections a hash can still split them unevenly).
The supervisor checks that the port is free and keeps it bound (not listening), restarts a process
that dies, and passes SIGTERM/SIGINT on, so each process drains (see `DrainingServer`) and the
supervisor exits once all have. Every process has its own connection pool (DB_POOL_MAX each);
rate limits and `/metrics` hold for the whole deployment (api/ratelimit.py, api/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from settings import get_settings
from storage.migrate import require_migrated

log = logging.getLogger("coordinator.api")

# A process that dies sooner than this after its start is failing to start: stop rather than loop.
MIN_UPTIME_S = 5.0


def run_api() -> None:
    settings = get_settings()
    require_migrated(settings.DATABASE_URL, "api")
    config = uvicorn.Config("api.app:create_app", factory=True, host=settings.HOST, port=settings.PORT,
                            log_level=os.environ.get("LOG_LEVEL", "info").lower(), access_log=False,
                            http=CoalescingHttpProtocol)
    processes = settings.API_PROCESSES or os.cpu_count() or 1
    if processes == 1:
        DrainingServer(config).run()
    else:
        Supervisor(config, processes).run()


class CoalescingTransport:
    """A transport whose writes made in one turn of the event loop leave in one send. uvicorn writes
    an answer's head and its body separately: two system calls and two TCP segments per answer,
    about a tenth of the API's CPU on a small GET, and as much again for the client to receive."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the socket transport's
        return getattr(self._transport, name)


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT `/ready` answers 503 draining while in-flight requests finish."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = getattr(self.config, "loaded_app", None)
        while app is not None and not hasattr(app, "state"):  # unwrap uvicorn's middleware
            app = getattr(app, "app", None)
        if app is not None:
            app.state.draining = True
        super().handle_exit(sig, frame)


def reuse_port_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def serve_process(config: uvicorn.Config) -> None:
    """One API process: a draining uvicorn server on its own socket of the port."""
    sock = reuse_port_socket(config.host, config.port, listen=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    config.configure_logging()  # a spawned process starts with logging unconfigured
    DrainingServer(config).run(sockets=[sock])


class Supervisor:
    """N API processes on one socket; restarts the ones that die, drains them all on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, processes: int) -> None:
        self.config, self.count = config, processes
        self.context = multiprocessing.get_context("spawn")
        self.stopping = False

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, float]:
        proc = self.context.Process(target=serve_process, args=(self.config,), name="coordinator-api")
        proc.start()
        return proc, time.monotonic()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> None:
        logging.basicConfig(level=os.environ.get("LOG_LEVEL", "info").upper(), format="%(levelname)s:     %(message)s")
        # The processes' Prometheus series go to shared files, so /metrics from any one of them
        # reports the whole API (api/metrics.py). A directory we create is ours to delete.
        own_metrics_dir = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            own_metrics_dir = tempfile.mkdtemp(prefix="coordinator-api-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
        try:
            self._supervise()
        finally:
            if own_metrics_dir:
                shutil.rmtree(own_metrics_dir, ignore_errors=True)

    def _supervise(self) -> None:
        from prometheus_client import multiprocess

        # Fail now if anything holds the port, then keep it bound (not listening: no connection
        # waits on the supervisor) while the processes come and go.
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((self.config.host, self.config.port))
        sock = reuse_port_socket(self.config.host, self.config.port, listen=False)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        procs = [self._start() for _ in range(self.count)]
        log.info("api: %d processes on %s:%d (supervisor pid %d)", self.count, self.config.host, self.config.port,
                 os.getpid())
        failed = False
        while not self.stopping:
            time.sleep(0.2)
            for i, (proc, started) in enumerate(procs):
                if proc.is_alive() or self.stopping:
                    continue
                if time.monotonic() - started < MIN_UPTIME_S:
                    log.error("api process %d exited with %s right after its start: stopping", proc.pid, proc.exitcode)
                    self.stopping = failed = True
                    break
                log.warning("api process %d died (exit %s): starting another", proc.pid, proc.exitcode)
                multiprocess.mark_process_dead(proc.pid)
                procs[i] = self._start()
        for proc, _ in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            proc.join()
        sock.close()
        if failed:
            raise SystemExit(1)

