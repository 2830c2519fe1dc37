"""The workflow-outbox dispatcher (notices/, storage/notice_dispatch.py) against the session's real
Postgres and Temporal dev server, with a throwaway workflow type on its own task queue.

Rows are written with `storage.notices.enqueue`, as the command transactions do; the
probe workflow records every signal it gets, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from devstack.postgres import free_port
from notices.dispatcher import Dispatcher
from settings import Settings, load_settings
from storage import notice_dispatch
from storage.db import Database
from storage.notices import WorkflowNotice, enqueue, fanout_sql
from tests.conftest import eventually

PROBE = "DispatchProbe"
OPERATOR_TOKEN = "operator-token-for-dispatcher-tests"


@workflow.defn(name=PROBE, sandboxed=False)
class DispatchProbe:
    """Records every `note` signal's `n`; ends after a note with `end`."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.done = False

    @workflow.run
    async def run(self, args: dict) -> list[int]:
        await workflow.wait_condition(lambda: self.done)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.got

    @workflow.signal(name="note")
    def note(self, payload: dict) -> None:
        self.got.append(payload["n"])
        if payload.get("end"):
            self.done = True

    @workflow.signal(name="notices")
    def notices(self, batch: list[dict]) -> None:  # several rows of one workflow, delivered together
        for item in batch:
            self.note(item["notice"])

    @workflow.query(name="got")
    def got_notes(self) -> list[int]:
        return self.got


@dataclass
class Env:
    settings: Settings
    db: Database
    client: Client
    task_queue: str
    prefix: str

    def settings_with(self, **overrides: Any) -> Settings:
        return load_settings(**{**self.settings.model_dump(), **overrides})

    def wid(self, name: Any) -> str:
        return f"{self.prefix}/{name}"

    async def enqueue(self, notes: list[tuple[str, int]], *, end: set[tuple[str, int]] = frozenset(),
                      search_attributes: dict[str, str] | None = None) -> None:
        """One transaction writing one `note` row per (workflow id, n), in that order."""
        notices = [WorkflowNotice(workflow_id=w, workflow_type=PROBE, signal="note",
                                  payload={"n": n, "end": (w, n) in end}, start_args={"workflow_id": w},
                                  search_attributes=search_attributes or {}, summary=f"probe {w}")
                   for w, n in notes]
        async with self.db.transaction() as conn:
            await enqueue(conn, notices)

    async def got(self, workflow_id: str) -> list[int]:
        return await self.client.get_workflow_handle(workflow_id).query("got")

    async def pending(self) -> int:
        return await notice_dispatch.pending(self.db, self.task_queue)

    async def rows(self) -> list[dict[str, Any]]:
        return await self.db.fetch("SELECT * FROM workflow_outbox WHERE task_queue = %s ORDER BY seq",
                                   (self.task_queue,))

    def dispatcher(self, client: Client | None | str = "default", **overrides: Any) -> Dispatcher:
        return Dispatcher(self.db, self.client if client == "default" else client,
                          self.settings_with(**overrides) if overrides else self.settings)


@pytest.fixture(scope="module")
async def env(postgres, temporal_server, tmp_root) -> AsyncIterator[Env]:
    task_queue = f"dispatch-{uuid.uuid4().hex[:8]}"
    settings = load_settings(DATABASE_URL=postgres.url("coordinator"), TEMPORAL_ADDRESS=temporal_server.address,
                             TEMPORAL_TASK_QUEUE=task_queue, CARACAL_COORDINATOR_TOKEN=OPERATOR_TOKEN,
                             JWKS_FILE=str(tmp_root / "dispatcher-tests-jwks.json"), READY_RATE_LIMIT_PER_MIN=0,
                             COORDINATOR_RATE_LIMIT_PER_MIN=0)
    # Rows written on these connections name this task queue: dispatchers of other tests sharing
    # the database leave them alone, and these dispatchers leave theirs alone.
    db = Database(settings.DATABASE_URL, max_size=10, task_queue=task_queue)
    await db.open()
    client = await Client.connect(temporal_server.address)
    worker = Worker(client, task_queue=task_queue, workflows=[DispatchProbe],
                    workflow_runner=UnsandboxedWorkflowRunner())
    async with worker:
        yield Env(settings, db, client, task_queue, f"probe-{uuid.uuid4().hex[:6]}")
    await db.execute("DELETE FROM workflow_outbox WHERE task_queue = %s", (task_queue,))
    await db.close()


@contextlib.asynccontextmanager
async def running(*dispatchers: Dispatcher) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def until(check, timeout: float, interval: float = 0.02):
    return await eventually(check, timeout=timeout, interval=interval)


class Proxy:
    """A TCP forwarder to Temporal on a port of its own: closed = Temporal unreachable."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.target = target
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(asyncio.current_task())


# ------------------------------------------------------------------------------------------- claim


async def test_claim_takes_heads_only_so_a_second_dispatcher_never_holds_a_later_row(env: Env):
    w1, w2 = env.wid("claim-1"), env.wid("claim-2")
    await env.enqueue([(w1, 1), (w2, 1), (w1, 2), (w1, 3), (w2, 2), (w1, 4)])
    async with env.db.transaction() as a:
        held = await notice_dispatch.claim(a, 10, 2, env.task_queue)
        # Heads and at most one follower each, in seq order.
        assert [(r["workflow_id"], r["payload"]["n"]) for r in held] == [(w1, 1), (w2, 1), (w1, 2), (w2, 2)]
        async with env.db.transaction() as b:
            # While A holds the heads, nothing of these workflows is a head for B.
            assert await notice_dispatch.claim(b, 10, 20, env.task_queue) == []
        # Another queue's dispatcher never sees these rows.
        async with env.db.transaction() as c:
            assert await notice_dispatch.claim(c, 10, 20, "some-other-queue") == []
        await notice_dispatch.delete_delivered(a, [r["seq"] for r in held])
    async with env.db.transaction() as b:
        rest = await notice_dispatch.claim(b, 10, 20, env.task_queue)
        assert [(r["workflow_id"], r["payload"]["n"]) for r in rest] == [(w1, 3), (w1, 4)]
        # A deferred head holds its workflow back: its followers are not heads.
        await notice_dispatch.defer(b, [notice_dispatch.Deferral(rest[0]["seq"], 60, "boom")])
    async with env.db.transaction() as c:
        assert await notice_dispatch.claim(c, 10, 20, env.task_queue) == []
    row = (await env.rows())[0]
    assert (row["attempts"], row["last_error"]) == (1, "boom")
    await env.db.execute("DELETE FROM workflow_outbox WHERE task_queue = %s", (env.task_queue,))


async def test_claim_takes_heads_due_soon_before_older_rows(env: Env):
    """A backlog of starts must not make a timer late: heads whose deadline is near go first."""
    old, soon, later = env.wid("due-old"), env.wid("due-soon"), env.wid("due-later")
    await env.enqueue([(old, 1), (later, 1), (soon, 1)])
    await env.db.execute("UPDATE workflow_outbox SET due_at = now() + interval '5 seconds' WHERE workflow_id = %s",
                         (soon,))
    await env.db.execute("UPDATE workflow_outbox SET due_at = now() + interval '1 hour' WHERE workflow_id = %s",
                         (later,))
    async with env.db.transaction() as a:
        first = await notice_dispatch.claim(a, 1, 1, env.task_queue)
        assert [r["workflow_id"] for r in first] == [soon]
        async with env.db.transaction() as b:
            rest = await notice_dispatch.claim(b, 10, 1, env.task_queue)
            assert [r["workflow_id"] for r in rest] == [old, later]  # then by age
    await env.db.execute("DELETE FROM workflow_outbox WHERE task_queue = %s", (env.task_queue,))


async def test_a_cascade_fanout_is_spread_in_place_and_holds_back_the_rows_behind_it(env: Env):
    """A subtree cascade writes one fan-out row; its sessions' notices keep the seqs drawn in the
    command, so a later row of one of those workflows waits for them, and then goes after them."""
    zone = f"fan-{uuid.uuid4().hex[:6]}"

    async def write_fanout(*ids: str) -> None:
        """One transaction writing the fan-out row of a cascade over these (made-up) sessions."""
        async with env.db.transaction() as conn:
            await conn.execute("CREATE TEMP TABLE fan (LIKE sessions INCLUDING DEFAULTS) ON COMMIT DROP")
            for sid in ids:
                await conn.execute(
                    """INSERT INTO fan (id, zone_id, application_id, lifecycle, status, state_version, root_id,
                                        started_at, ttl_seconds, subject_authority_record_id)
                       VALUES (%s, %s, 'app', 'task', 'suspended', 2, %s, '2026-11-30T09:00:00Z', 60, 'ar')""",
                    (sid, zone, sid))
            await conn.execute(f"""WITH changed AS (SELECT * FROM fan), notices AS ({fanout_sql("changed", "c.id")})
                                   SELECT count(*) FROM notices""",
                               {"signal": "suspended", "summary": "cascade", "reason": "requested"})

    await write_fanout("s2", "s1", "s3")
    s1 = f"session/{zone}/s1"
    await env.enqueue([(s1, 7)])  # a later change of s1
    assert await env.pending() == 4  # three notices in the fan-out row, one row
    assert not await notice_dispatch.delivered(env.db, s1)
    async with env.db.transaction() as a:
        # Not spread yet: the row behind it is no head (s1's notice in the fan-out comes first).
        assert await notice_dispatch.claim(a, 10, 10, env.task_queue) == []
    assert await notice_dispatch.spread_fanouts(env.db, env.task_queue, 10) == 3
    async with env.db.transaction() as a:
        held = await notice_dispatch.claim(a, 10, 10, env.task_queue)
        # In the cascade's order (here by id), each with its seq; s1's later row behind its notice.
        assert [(r["workflow_id"].rsplit("/", 1)[1], r["signal"]) for r in held] == [
            ("s1", "suspended"), ("s2", "suspended"), ("s3", "suspended"), ("s1", "note")]
        assert held[0]["payload"]["session"]["state_version"] == 2
        assert held[0]["payload"]["session"]["reason"] == "requested"
        assert held[0]["summary"] == "task session s1 of app"
        await notice_dispatch.delete_delivered(a, [r["seq"] for r in held])

    # The spread is committed at once: while one dispatcher's batch is still open, another
    # dispatcher claims the rest of a cascade (and what follows it).
    await write_fanout("s4", "s5")
    assert await notice_dispatch.spread_fanouts(env.db, env.task_queue, 10) == 2
    async with env.db.transaction() as a:
        first = await notice_dispatch.claim(a, 1, 10, env.task_queue)
        async with env.db.transaction() as b:
            rest = await notice_dispatch.claim(b, 10, 10, env.task_queue)
            await notice_dispatch.delete_delivered(b, [r["seq"] for r in rest])
        assert len(first) == len(rest) == 1
        assert sorted(r["workflow_id"].rsplit("/", 1)[1] for r in first + rest) == ["s4", "s5"]
        await notice_dispatch.delete_delivered(a, [r["seq"] for r in first])
    assert await env.pending() == 0
    assert await notice_dispatch.delivered(env.db, s1)


# ------------------------------------------------------------------------------------------- order


async def test_two_dispatchers_deliver_in_order_per_workflow_none_lost_none_twice(env: Env):
    workflows = [env.wid(f"order-{i}") for i in range(30)]
    per_workflow = 12
    # Small batches and chains, so that the two dispatchers interleave on every workflow.
    a = env.dispatcher(DISPATCH_BATCH_SIZE=7, DISPATCH_PER_WORKFLOW=3)
    b = env.dispatcher(DISPATCH_BATCH_SIZE=5, DISPATCH_PER_WORKFLOW=2)
    async with running(a, b):
        # Many small transactions, each touching several workflows (like cascades), written while
        # the dispatchers run.
        for n in range(per_workflow):
            for chunk in range(0, len(workflows), 10):
                await env.enqueue([(w, n) for w in workflows[chunk:chunk + 10]])
            await asyncio.sleep(0.01)
        await until(lambda: _zero(env), timeout=20)
    assert a.delivered + b.delivered == len(workflows) * per_workflow
    assert a.delivered > 0 and b.delivered > 0, (a.delivered, b.delivered)
    assert a.failed == b.failed == 0
    for w in workflows:
        assert await env.got(w) == list(range(per_workflow)), w
    # Both stopped cleanly: their totals are kept, their rows are gone from the running list.
    stats = await notice_dispatch.dispatch_stats(env.db)
    assert stats["delivered_total"] >= len(workflows) * per_workflow
    assert await env.db.fetchval("SELECT count(*) FROM workflow_dispatchers WHERE dispatcher_id IN (%s, %s)",
                                 (a.id, b.id)) == 0


async def _zero(env: Env) -> bool:
    return await env.pending() == 0


async def test_signal_with_start_carries_start_args_search_attributes_and_summary(env: Env):
    w = env.wid("attrs")
    await env.enqueue([(w, 1)], search_attributes={"ZoneId": "zone-dispatch", "SessionId": "s-1"})
    assert await env.dispatcher().drain(timeout=10) == 1
    desc = await env.client.get_workflow_handle(w).describe()
    assert desc.workflow_type == PROBE and desc.task_queue == env.task_queue
    assert desc.typed_search_attributes.get(SearchAttributeKey.for_keyword("ZoneId")) == "zone-dispatch"
    assert await desc.static_summary() == f"probe {w}"
    assert await env.got(w) == [1]


async def _signals(env: Env, workflow_id: str, expected: list[str]) -> list[str]:
    """The names of the signals in the workflow's history, in order, once they are `expected` or 5 s
    have passed. A signal that arrives while a workflow task is running is buffered by the server and
    only enters the history when that task completes, so the history can lag the acknowledged signal."""
    deadline = time.monotonic() + 5
    while True:
        names = []
        async for event in env.client.get_workflow_handle(workflow_id).fetch_history_events():
            if event.HasField("workflow_execution_signaled_event_attributes"):
                names.append(event.workflow_execution_signaled_event_attributes.signal_name)
        if names == expected or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.05)


async def test_a_workflow_signalled_just_now_gets_its_next_rows_together(env: Env):
    """DISPATCH_LINGER_MS: rows of a workflow signalled less than the linger ago wait for it and then
    go in one `notices` signal; another workflow's row goes at once."""
    hot, cold = env.wid("linger-hot"), env.wid("linger-cold")
    d = env.dispatcher(DISPATCH_LINGER_MS=1500)
    await env.enqueue([(hot, 1)])
    assert (await d.deliver_batch()).delivered == 1
    await env.enqueue([(hot, 2)])
    await env.enqueue([(hot, 3), (cold, 1)])
    await env.db.execute("UPDATE workflow_outbox SET last_error = 'earlier failure' WHERE workflow_id = %s", (hot,))
    result = await d.deliver_batch()
    assert (result.delivered, result.lingering, result.failed) == (1, 2, 0)  # cold at once; hot put off
    assert [(r["workflow_id"], r["last_error"]) for r in await env.rows()] == [(hot, "earlier failure")] * 2
    assert await env.got(cold) == [1]
    assert 0 < d._next_pause() <= 1.0  # the run loop claims again when the first row put off is due
    delivered, started = 0, time.monotonic()
    while not delivered and time.monotonic() - started < 5:
        await asyncio.sleep(0.05)
        delivered = (await d.deliver_batch()).delivered
    assert delivered == 2 and time.monotonic() - started > 0.5  # the two together, once the linger passed
    assert await env.got(hot) == [1, 2, 3]
    assert await _signals(env, hot, ["note", "notices"]) == ["note", "notices"]
    assert await env.db.fetchval("SELECT count(*) FROM workflow_outbox WHERE task_queue = %s AND attempts > 0",
                                 (env.task_queue,)) == 0  # putting off is not a failed attempt
    # Without a linger, each row is its own signal.
    d0, w = env.dispatcher(DISPATCH_LINGER_MS=0), env.wid("linger-off")
    for n in (1, 2):
        await env.enqueue([(w, n)])
        assert (await d0.deliver_batch()).delivered == 1
    assert await _signals(env, w, ["note", "note"]) == ["note", "note"]
    assert d0._signalled == {}  # without a linger no workflow is remembered (the map would only grow)


# --------------------------------------------------------------------------------------- failures


async def test_a_completed_workflow_row_is_dropped(env: Env):
    w = env.wid("completed")
    await env.enqueue([(w, 1)], end={(w, 1)})
    d = env.dispatcher()
    await d.drain(timeout=10)
    handle = env.client.get_workflow_handle(w)
    assert await asyncio.wait_for(handle.result(), 10) == [1]
    run_id = (await handle.describe()).run_id
    await env.enqueue([(w, 2)])
    assert await d.drain(timeout=10) == 1
    assert d.dropped == 1 and d.failed == 0
    desc = await handle.describe()
    assert desc.status == WorkflowExecutionStatus.COMPLETED and desc.run_id == run_id  # not started again
    assert await env.pending() == 0


async def test_a_rejected_row_is_retried_with_backoff_and_holds_back_its_workflow_only(env: Env):
    bad, good = env.wid("rejected"), env.wid("unaffected")
    await env.enqueue([(bad, 1)], search_attributes={"NoSuchAttribute": "x"})  # the server refuses it
    await env.enqueue([(bad, 2), (good, 1), (good, 2)])
    d = env.dispatcher()
    first = await d.deliver_batch()
    assert first.temporal_ok is True and first.failed == 1 and first.delivered == 2
    [row1, row2] = await env.rows()
    assert row1["payload"]["n"] == 1 and row1["attempts"] == 1 and "NoSuchAttribute" in row1["last_error"]
    assert row2["payload"]["n"] == 2 and row2["attempts"] == 0  # behind the failure: untouched
    assert await env.got(good) == [1, 2]
    assert 0.1 < (row1["available_at"] - row1["created_at"]).total_seconds() < 5
    assert (await d.deliver_batch()).claimed == 0  # backing off
    await env.db.execute("UPDATE workflow_outbox SET search_attributes = '{}' WHERE seq = %s", (row1["seq"],))
    assert await d.drain(timeout=10) == 2
    assert await env.got(bad) == [1, 2]


async def test_over_temporal_backlog_only_rows_due_soon_go(env: Env):
    """While Temporal's workflow tasks pile up, rows stay in the outbox (ordered by urgency) except
    those whose deadline is near, so a backlog of starts never makes a timer late."""
    d = env.dispatcher(DISPATCH_MAX_TEMPORAL_BACKLOG=10)
    d.temporal_backlog = 1000  # as the watcher would report it (not running here)
    later, soon = env.wid("held-later"), env.wid("held-soon")
    await env.enqueue([(later, 1), (soon, 1)])
    await env.db.execute("UPDATE workflow_outbox SET due_at = now() + interval '5 seconds' WHERE workflow_id = %s",
                         (soon,))
    result = await d.deliver_batch()
    assert result.delivered == 1 and [r["workflow_id"] for r in await env.rows()] == [later]
    d.temporal_backlog = 0
    assert (await d.deliver_batch()).delivered == 1 and await env.rows() == []
    assert [await env.got(w) for w in (later, soon)] == [[1], [1]]


async def test_the_hold_back_follows_temporals_backlog_within_a_second(env: Env):
    """A running dispatcher reads Temporal's real workflow-task backlog: it holds back once starts
    pile up on a task queue no worker polls, and delivers the held row as soon as a worker drains
    them, without waiting for its poll interval. (The dev server caches the figure for 5 s unless
    told otherwise: rules/workflow_contract.SERVER_DYNAMIC_CONFIG.)"""
    task_queue = f"held-{uuid.uuid4().hex[:8]}"
    db = Database(env.settings.DATABASE_URL, max_size=4, task_queue=task_queue)
    await db.open()
    queue_env = Env(env.settings_with(TEMPORAL_TASK_QUEUE=task_queue), db, env.client, task_queue, env.prefix)
    d = queue_env.dispatcher(DISPATCH_MAX_TEMPORAL_BACKLOG=2, DISPATCH_POLL_INTERVAL_MS=30_000, DISPATCH_LINGER_MS=0)
    first = [queue_env.wid(f"held-{i}") for i in range(3)]
    last = queue_env.wid("held-last")
    try:
        async with running(d):
            await queue_env.enqueue([(w, 1) for w in first], end={(w, 1) for w in first})
            await until(lambda: d.delivered == 3, timeout=5)
            await until(lambda: d.temporal_backlog >= 3, timeout=2)  # three first workflow tasks, no worker
            await queue_env.enqueue([(last, 1)], end={(last, 1)})
            await asyncio.sleep(1.0)
            assert [r["workflow_id"] for r in await queue_env.rows()] == [last]  # held back
            worker = Worker(env.client, task_queue=task_queue, workflows=[DispatchProbe],
                            workflow_runner=UnsandboxedWorkflowRunner())
            async with worker:
                await until(lambda: d.delivered == 4, timeout=3)
                assert await env.client.get_workflow_handle(last).result() == [1]
    finally:
        await db.execute("DELETE FROM workflow_outbox WHERE task_queue = %s", (task_queue,))
        await db.close()


async def test_rows_wait_while_temporal_is_unreachable_and_drain_when_it_is_back(env: Env):
    from api.app import create_app
    from api.auth import Authenticator
    from api.deps import Services

    proxy = Proxy(env.client.service_client.config.target_host)
    lazy = await Client.connect(proxy.address, lazy=True)  # nothing listens there yet
    workflows = [env.wid(f"outage-{i}") for i in range(5)]
    await env.enqueue([(w, n) for n in range(3) for w in workflows])
    d = env.dispatcher(lazy)
    settings = env.settings.model_copy(update={"FOLLOW_LAG_TARGET_SECONDS": 1.0})
    services = Services(settings, env.db, lazy, Authenticator(settings, env.db))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services=services)), base_url="http://t")
    try:
        async with running(d):
            await asyncio.sleep(1.5)
            assert d.temporal_ok is False and d.delivered == 0
            rows = await env.rows()
            assert len(rows) == 15 and all(r["attempts"] == 0 for r in rows)  # waiting, not failing
            assert any(r["last_error"] for r in rows)
            # /ready keeps answering 200 (commands do not need Temporal) and names the backlog.
            r = await http.get("/ready")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["ok"] is True and body["worker"] == "unknown"
            outbox = body["workflow_outbox"]
            assert outbox["backlog"] >= 15 and outbox["oldest_age_seconds"] >= 1.0
            assert outbox["dispatchers"] >= 1 and outbox["temporal"] == "unreachable"
            assert outbox["following"] == "behind"  # and still ready
            with pytest.raises(TimeoutError):
                await env.dispatcher(lazy).drain(timeout=0.5)
            # Temporal is back.
            await proxy.open()
            await until(lambda: _zero(env), timeout=10)
            assert d.temporal_ok is True
            await asyncio.sleep(1.2)  # a stats write

            async def metrics_once_drained() -> dict[str, float] | None:
                r = await http.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
                assert r.status_code == 200, r.text
                values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.text.splitlines()
                          if line.startswith(("coordinator_workflow_", "coordinator_reconciler", "coordinator_follow"))}
                return values if values["coordinator_workflow_outbox_backlog"] == 0 else None

            # The backlog is the whole outbox's: another stack sharing this database (the session
            # stack's reconciler, say) may have rows in it for a moment, which its dispatcher takes.
            metrics = await until(metrics_once_drained, timeout=10)
            assert metrics["coordinator_workflow_outbox_delivered_total"] >= 15
            assert metrics["coordinator_workflow_outbox_delivered_per_second"] > 0
            assert metrics["coordinator_workflow_signal_lag_p95_ms"] >= 1000  # they waited for Temporal
            assert "coordinator_reconciler_started_total" in metrics
            assert "coordinator_reconciler_quiet_runs_total" in metrics
            # The follow-lag histogram counts them, none under a second (they waited for Temporal).
            assert metrics["coordinator_follow_lag_seconds_count"] >= 15
            assert (metrics['coordinator_follow_lag_seconds_bucket{le="+Inf"}']
                    - metrics['coordinator_follow_lag_seconds_bucket{le="1.0"}']) >= 15
        for w in workflows:
            assert await env.got(w) == [0, 1, 2]
        assert d.delivered == 15
        # Temporal goes away under a connected client (its own retries would take 10 s): each
        # RPC is cut at the deadline, the rows wait, and they go as soon as Temporal is back.
        d2 = env.dispatcher(lazy, DISPATCH_RPC_TIMEOUT_SECONDS=0.5)
        async with running(d2):
            await proxy.close()
            await env.enqueue([(w, 3) for w in workflows])
            await until(lambda: d2.temporal_ok is False, timeout=5)
            assert len(await env.rows()) == 5
            await proxy.open()
            await until(lambda: _zero(env), timeout=10)
        for w in workflows:
            assert await env.got(w) == [0, 1, 2, 3]
    finally:
        await http.aclose()
        await services.auth.aclose()
        await proxy.close()


# ----------------------------------------------------------------------------------------- wake-up


async def test_notify_wakes_the_dispatcher_long_before_the_poll_interval(env: Env):
    d = env.dispatcher(DISPATCH_POLL_INTERVAL_MS=10_000)
    async with running(d):
        await until(lambda: d.listening, timeout=5)
        await asyncio.sleep(0.3)  # idle: waiting on LISTEN, next poll in ~10 s
        for i in range(3):
            w = env.wid(f"notify-{i}")
            t0 = time.monotonic()
            await env.enqueue([(w, 1)])
            await until(lambda: _zero(env), timeout=5, interval=0.01)
            assert time.monotonic() - t0 < 1.5
            assert await env.got(w) == [1]
            if i == 0:  # Postgres drops the LISTEN connection: the dispatcher listens again
                killed = await env.db.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND query = 'LISTEN workflow_outbox'")
                assert killed >= 1
                await until(lambda: not d.listening, timeout=35)
                await until(lambda: d.listening, timeout=10)
                await asyncio.sleep(0.3)


async def test_without_postgres_the_dispatcher_keeps_running_and_stops_cleanly(env: Env):
    dead = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout_s=1)
    await dead.open(wait=False)
    try:
        d = Dispatcher(dead, env.client, env.settings)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        await asyncio.sleep(1.0)
        assert not task.done() and not d.listening
        stop.set()
        await asyncio.wait_for(task, 10)  # no exception
    finally:
        await dead.close()
