"""Postgres access: one async psycopg pool per process, plain SQL, dict rows.

Every multi-entity change runs inside `db.transaction()`; reads use `fetch` / `fetchrow` / `fetchval`.
A Postgres outage surfaces as `CoordinatorError(503, "postgres_unavailable")` so the API can answer
it as JSON and the worker's activities retry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb, set_json_dumps
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rules.errors import CoordinatorError

__all__ = ["Database", "Jsonb", "Conn", "CommitRows", "Refused", "XACT_LOCK_SQL", "one", "postgres_unavailable",
           "refuse_sql"]

# A transaction advisory lock on a text key (released at COMMIT or ROLLBACK); one parameter, the key.
XACT_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"


# Who the current request acts as, set by the API: every transaction it begins names it in the
# `coordinator.actor` setting (read by the status-history triggers, storage/history.py), with the BEGIN.
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("coordinator_actor", default=None)
_SET_ACTOR_SQL = "SELECT set_config('coordinator.actor', %s, true)"


async def _send_begin(conn: psycopg.AsyncConnection[Any]) -> None:
    """BEGIN, and the actor's setting; inside a pipeline, so no round trip of their own."""
    await psycopg.AsyncConnection.execute(conn, "BEGIN")
    actor = ACTOR.get()
    if actor is not None:
        await psycopg.AsyncConnection.execute(conn, _SET_ACTOR_SQL, (actor,))


class _Connection(psycopg.AsyncConnection[DictRow]):
    """The pool's connections. Inside `Database.transaction` the BEGIN is not a round trip of its
    own: it travels with the transaction's first statement (or batch, see `q_batch`)."""

    begin_pending = False

    async def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                      binary: bool = False) -> Any:
        if not self.begin_pending:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        self.begin_pending = False
        async with self.pipeline():
            await _send_begin(self)
            return await super().execute(query, params, prepare=prepare, binary=binary)


Conn = psycopg.AsyncConnection[DictRow]
T = TypeVar("T")
# Run by `Database.run` inside the transaction, just before its COMMIT, with the command's result.
BeforeCommit = Callable[[Conn, T], Awaitable[None]]

# Two commands whose cascades overlap can deadlock (Postgres aborts one); that one runs again.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def _dumps_json(value: Any) -> bytes | str:
    """JSON for `Jsonb` parameters: orjson (a cascade's events and notices are one document of
    hundreds of objects; the standard encoder took about 3 ms for 200), or the standard encoder
    for what orjson refuses (integers beyond 64 bits in client metadata)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value)


set_json_dumps(_dumps_json)


# `coordinator_refuse(code)` (migration 0007): a statement's way to stop its transaction for a
# reason the command handles (e.g. a check made before a lock no longer holds under it).
REFUSAL_SQLSTATE = "CR000"


def refuse_sql(code: str) -> str:
    """A boolean SQL expression that raises `Refused(code)` out of `Database.run` when evaluated."""
    assert code.replace("_", "").isalnum()
    return f"coordinator_refuse('{code}')"


class Refused(Exception):
    """A statement of the transaction refused (`refuse_sql`); nothing of it was written."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def postgres_unavailable() -> CoordinatorError:
    return CoordinatorError(503, "postgres_unavailable", dependency="postgres")


_OUTAGE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def is_outage(exc: BaseException) -> bool:
    # A deadlock or serialization failure is an OperationalError too, but Postgres is up.
    return isinstance(exc, _OUTAGE_ERRORS) and not isinstance(exc, _RETRYABLE)


class Database:
    def __init__(self, url: str, *, max_size: int = 20, min_size: int = 1,
                 statement_timeout_ms: int = 10000, connect_timeout_s: float = 5.0,
                 task_queue: str | None = None) -> None:
        self.url = url
        options = f"-c statement_timeout={statement_timeout_ms}"
        if task_queue:  # workflow-outbox rows written on these connections name this queue
            options += f" -c coordinator.task_queue={task_queue}"
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=connect_timeout_s,
            connection_class=_Connection,
            kwargs={"row_factory": dict_row, "autocommit": True, "options": options,
                    "connect_timeout": max(1, int(connect_timeout_s))},
            check=self._check_if_idle,
            reconnect_timeout=3600 * 24,
        )
        self._returned_at: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()

    # A connection in steady use is known good: pinging it at every checkout would add a round
    # trip to every transaction. One idle for a while (Postgres may have restarted) is pinged.
    _CHECK_AFTER_IDLE_S = 2.0

    async def _check_if_idle(self, conn: Conn) -> None:
        returned = self._returned_at.get(conn)
        if returned is None or time.monotonic() - returned > self._CHECK_AFTER_IDLE_S or conn.closed:
            await AsyncConnectionPool.check_connection(conn)

    async def open(self, wait: bool = True) -> None:
        await self.pool.open(wait=wait, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        try:
            async with self.pool.connection() as conn:
                try:
                    yield conn
                finally:
                    # Marked here, not by a pool `reset` callback: with one, the pool hands every
                    # returned connection to a worker task (about 40 us of CPU per checkout).
                    self._returned_at[conn] = time.monotonic()
        except _OUTAGE_ERRORS as exc:
            if not is_outage(exc):
                raise  # a deadlock: `run` retries it
            raise postgres_unavailable() from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A connection inside BEGIN ... COMMIT; any exception rolls everything back.

        Statements given to `at_commit` travel with the COMMIT in one pipelined round trip: a
        command's events and workflow notices cost no round trip of their own, and the locks it
        holds are released one round trip sooner (creates of one zone queue on its capacity lock).
        Likewise the BEGIN travels with the first statement. BEGIN and COMMIT are plain
        statements (not psycopg's `transaction()`) so that an error in a pipelined statement
        surfaces as itself, a deadlock included (`run` retries those)."""
        async with self.connection() as conn:  # which turns an outage into postgres_unavailable
            pending: list[tuple[str, Any, CommitRows]] = []
            _AT_COMMIT[conn] = pending
            try:
                await _begin(conn)
                try:
                    yield conn
                    if pending:
                        async with conn.pipeline():
                            cursors = [(await conn.execute(sql, params), rows) for sql, params, rows in pending]
                            await conn.execute("COMMIT")
                        for cur, rows in cursors:
                            rows.rows = await cur.fetchall() if _returns_rows(cur) else []
                    elif not _cancel_pending_begin(conn):  # a transaction that ran nothing commits nothing
                        await conn.execute("COMMIT")
                except BaseException as exc:
                    _cancel_pending_begin(conn)
                    if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        # Best effort: a connection it fails on is discarded by the pool on return.
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                    if isinstance(exc, (psycopg.Error, asyncio.CancelledError)):
                        await _forget_prepared_statements(conn)
                    raise
            finally:
                _AT_COMMIT.pop(conn, None)

    async def run(self, command: Callable[[Conn], Awaitable[T]], attempts: int = 3, *,
                  before_commit: Callable[[Conn, T], Awaitable[None]] | None = None) -> T:
        """Run `command` as one transaction; again (from scratch) after a deadlock or serialization
        failure, since nothing of the aborted attempt was written. `before_commit(conn, result)`
        runs in the transaction once `command` has returned (e.g. to add an `at_commit` record
        of the answer)."""
        for attempt in range(attempts):
            try:
                async with self.transaction() as conn:
                    result = await command(conn)
                    if before_commit is not None:
                        await before_commit(conn, result)
                    return result
            except _RETRYABLE as exc:
                if attempt == attempts - 1:
                    raise postgres_unavailable() from exc  # 503: the client may try again
                await asyncio.sleep(0.01 * (attempt + 1))
            except psycopg.Error as exc:
                if exc.sqlstate == REFUSAL_SQLSTATE:
                    raise Refused(exc.diag.message_primary or "") from exc
                raise
        raise AssertionError("unreachable")

    async def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def fetchrow(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        async with self.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def fetchval(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = await self.fetchrow(sql, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        async with self.connection() as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount


class CommitRows:
    """The rows an `at_commit` statement returned: None until its transaction has committed."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] | None = None


# The statements each open `Database.transaction` runs with its COMMIT (see `at_commit`).
_AT_COMMIT: weakref.WeakKeyDictionary[Conn, list[tuple[str, Any, CommitRows]]] = weakref.WeakKeyDictionary()


async def _begin(conn: Conn) -> None:
    """BEGIN, sent with the transaction's first statement (by a connection of the pool)."""
    if isinstance(conn, _Connection):
        conn.begin_pending = True
    else:
        async with conn.pipeline():
            await _send_begin(conn)


def _cancel_pending_begin(conn: Conn) -> bool:
    """True when the transaction never began (its BEGIN was still waiting for a statement)."""
    if isinstance(conn, _Connection) and conn.begin_pending:
        conn.begin_pending = False
        return True
    return False


async def at_commit(conn: Conn, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> CommitRows:
    """Run a write with the COMMIT of the `Database.transaction` holding `conn` (in order, after
    everything else the transaction runs); at once outside one. Its rows are there once it has
    committed. An error in it fails the commit, and the whole transaction rolls back."""
    rows = CommitRows()
    pending = _AT_COMMIT.get(conn)
    if pending is None:
        cur = await conn.execute(sql, params)
        rows.rows = await cur.fetchall() if _returns_rows(cur) else []
    else:
        pending.append((sql, params, rows))
    return rows


async def q(conn: Conn, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
    """Run a statement on a connection already inside a transaction and return all rows."""
    cur = await conn.execute(sql, params)
    return await cur.fetchall() if _returns_rows(cur) else []


async def q_batch(conn: Conn, *statements: tuple[str, Sequence[Any] | dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Several statements in one round trip (pipelined; Postgres runs them in order, each with its
    own snapshot): the rows of each. The first error raises as itself, and the transaction is
    failed as after any error. What a statement locks is held by the ones after it, so a lock
    taken here costs no round trip of its own."""
    async with conn.pipeline() as pipeline:
        if _cancel_pending_begin(conn):  # the transaction's BEGIN goes first, in this round trip
            await _send_begin(conn)
        cursors = [await conn.execute(sql, params) for sql, params in statements]
        await pipeline.sync()
    return [await cur.fetchall() if _returns_rows(cur) else [] for cur in cursors]


async def _forget_prepared_statements(conn: Conn) -> None:
    """After a failed pipeline, let psycopg prepare its statements afresh.

    psycopg (3.3.9) names a statement prepared when it queues the Parse. In a pipeline that an
    earlier statement's error aborts, Postgres skips that Parse, yet the name stays in psycopg's
    cache, and the statement's next use fails with "prepared statement _pg3_N does not exist"
    (tests/test_storage_db.py reproduces it). Clearing the cache makes psycopg send DEALLOCATE ALL
    before its next statement and prepare again from the count. Without that (private) cache, the
    connection is closed, and the pool replaces it."""
    prepared = getattr(conn, "_prepared", None)
    if prepared is not None and callable(getattr(prepared, "clear", None)):
        prepared.clear()
    else:
        await conn.close()


def one(row: T | None) -> T:
    """The row of a statement that always returns one (an aggregate, INSERT ... RETURNING, an UPDATE
    of a row the transaction holds locked): no row there is a bug, not a missing entity."""
    if row is None:
        raise AssertionError("the statement returned no row")
    return row


async def q1(conn: Conn, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone() if _returns_rows(cur) else None


def _returns_rows(cur: psycopg.AsyncCursor[Any]) -> bool:
    # Not `cur.description`: it builds a Column object per column on every call (5 % of a read).
    res = cur.pgresult
    return res is not None and res.status == psycopg.pq.ExecStatus.TUPLES_OK


# ------------------------------------------------------------------------------- LISTEN / NOTIFY


class ChannelListener:
    """Keeps a dedicated LISTEN connection on one channel until cancelled, reconnecting with backoff.

    `on_connect` runs after each (re)connect (whatever was notified meanwhile was missed),
    `on_notify` after each notification, with its payload, `on_lost` when the connection is lost
    or cannot be made; `listening` says whether notifications are arriving right now."""

    def __init__(self, url: str, channel: str, *, on_notify: Callable[[str], None],
                 on_connect: Callable[[], None] = lambda: None, on_lost: Callable[[Exception], None] = lambda e: None,
                 connect_timeout_s: float = 5.0) -> None:
        self.url, self.channel = url, channel
        self.on_notify, self.on_connect, self.on_lost = on_notify, on_connect, on_lost
        self.connect_timeout_s = connect_timeout_s
        self.listening = False

    async def run(self) -> None:
        backoff = 0.5
        while True:
            conn = None
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                             connect_timeout=max(1, int(self.connect_timeout_s)))
                await conn.execute(f"LISTEN {self.channel}")
                self.listening = True
                backoff = 0.5
                self.on_connect()
                while True:
                    got = False
                    async for notify in conn.notifies(timeout=30.0):
                        got = True
                        self.on_notify(notify.payload)
                    if not got:  # a quiet half minute: make sure the connection is still there
                        await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — Postgres away: try again until it is back
                self.listening = False
                self.on_lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
