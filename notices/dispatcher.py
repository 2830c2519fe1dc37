"""Deliver the workflow outbox to Temporal with signal-with-start (docs/DESIGN.md, "Postgres decides,
Temporal follows").

One batch: spread the fan-out rows of subtree cascades into outbox rows (one statement of its
own); then, in one Postgres transaction, claim head rows and their followers (storage/notice_dispatch.py),
deliver them (different workflows concurrently; the claimed rows of one workflow in one
signal-with-start, as their own signal when alone and as one `notices` signal in `seq` order when
several, so a dispatcher that is behind costs Temporal fewer round trips), delete what was
delivered, defer what failed, commit.
The transaction stays open while delivering, so a crash redelivers the rows: delivery is at least
once, and the workflows ignore a notice whose state_version they have passed.

Wake-ups come from `LISTEN workflow_outbox` (every `enqueue` notifies at commit), with a poll every
DISPATCH_POLL_INTERVAL_MS as a fallback and to retry deferred rows. While Temporal is unreachable
the rows stay where they are (no attempt is counted) and the dispatcher probes with one row a
second; a row Temporal rejects is retried with exponential backoff (0.2 s doubling, capped at
DISPATCH_MAX_BACKOFF_SECONDS). A Postgres outage is logged and waited out. Nothing here raises
out of `run` but cancellation.

A workflow this dispatcher signalled less than DISPATCH_LINGER_MS ago is not signalled again at
once: its head row is put off (no attempt counted) until that time has passed, and the rows that
arrive meanwhile go with it in one `notices` signal. A hot workflow (a session giving one
delegation after another) then costs Temporal one signal per linger instead of one per change;
a workflow that is not hot gets its rows at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import (
    SearchAttributeKey, SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from rules.workflow_contract import (
    INVOCATION_SYNC, NOTICES, OPENING_SIGNALS, SA_BUILD_IDS, SESSION_SYNC, build_ids,
)
from settings import Settings
from storage import notice_dispatch
from storage.db import ChannelListener, Database
from storage.notices import NOTIFY_CHANNEL

SYNC = SESSION_SYNC
assert SYNC == INVOCATION_SYNC

__all__ = ["Dispatcher", "BatchResult", "Outcome", "backoff_seconds", "new_dispatcher_id"]

log = logging.getLogger("coordinator.dispatcher")

FIRST_BACKOFF_S = 0.2
RATE_WINDOW_S = 10.0
LAG_SAMPLES = 2000
STATS_INTERVAL_S = 1.0
# A dispatcher silent for this long has crashed: a starting dispatcher retires its row.
RETIRE_SILENT_S = 3600.0
# While Temporal is unreachable: one probe row at most this often, with at most this RPC deadline.
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
# How often Temporal's workflow-task backlog is read for the hold-back (the server must not cache it
# much longer: rules/workflow_contract.SERVER_DYNAMIC_CONFIG).
BACKLOG_POLL_S = 0.25
# Every RPC status that says "the server did not answer", as opposed to "the server said no".
_UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)


def new_dispatcher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Outcome:
    delivered: bool  # the workflow got the signal, or had already completed (dropped)
    dropped: bool = False
    unreachable: bool = False  # failed because Temporal did not answer
    error: str = ""


DELIVERED = Outcome(delivered=True)
DROPPED = Outcome(delivered=True, dropped=True)


@dataclass
class BatchResult:
    claimed: int = 0
    delivered: int = 0  # rows deleted after a successful signal-with-start
    dropped: int = 0  # of those, rows for a workflow that had already completed
    failed: int = 0  # rows whose delivery failed (deferred)
    skipped: int = 0  # rows left untouched behind a failure or past the batch deadline
    lingering: int = 0  # rows put off because their workflow was signalled very recently
    temporal_ok: bool | None = None  # None: nothing was sent
    errors: list[str] = field(default_factory=list)


def backoff_seconds(attempts: int, cap: float) -> float:
    """Delay before retrying a row that has failed `attempts` times before this failure."""
    return min(cap, FIRST_BACKOFF_S * (2 ** min(attempts, 30)))


def _percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


async def workflow_task_backlog(client: Client, task_queue: str) -> int:
    """Workflow tasks waiting on the task queue (Temporal's estimate, cached by the server for
    `matching.TaskQueueInfoByBuildIdTTL`)."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, report_stats=True)
    resp = await client.workflow_service.describe_task_queue(request, timeout=timedelta(seconds=2))
    return int(resp.stats.approximate_backlog_count)


class Dispatcher:
    """One dispatcher. Several may run at once, in one process or many (rows are claimed with
    SKIP LOCKED). `client=None` means no Temporal at all: the rows wait.

    `run(stop)` runs until `stop` is set; `drain(timeout)` delivers until nothing is left for this
    dispatcher's task queue (tests); `deliver_batch()` runs one claim-deliver-commit cycle."""

    def __init__(self, db: Database, client: Client | None, settings: Settings, *,
                 dispatcher_id: str | None = None) -> None:
        self.db = db
        self.client = client
        self.settings = settings
        self.id = dispatcher_id or new_dispatcher_id()
        self.task_queue = settings.TEMPORAL_TASK_QUEUE
        self.batch_size = settings.DISPATCH_BATCH_SIZE
        self.per_workflow = settings.DISPATCH_PER_WORKFLOW
        self.poll_interval = settings.DISPATCH_POLL_INTERVAL_MS / 1000
        self.max_backoff = settings.DISPATCH_MAX_BACKOFF_SECONDS
        self.rpc_timeout = settings.DISPATCH_RPC_TIMEOUT_SECONDS
        self._sem = asyncio.Semaphore(settings.DISPATCH_CONCURRENCY)
        # Counters since start (written to workflow_dispatchers about once a second).
        self.delivered = 0
        self.dropped = 0
        self.eager_started = 0  # workflows whose first task came back in the start's answer
        self.failed = 0
        self.temporal_ok = client is not None
        self.listening = False
        self._started = time.monotonic()
        self._health_touched = float("-inf")
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic, rows delivered) per batch
        self._lags_ms: deque[float] = deque(maxlen=LAG_SAMPLES)
        self.lags = notice_dispatch.LagHistogram()  # every delivery since start (the /metrics histogram)
        self._wake = asyncio.Event()
        self.max_temporal_backlog = settings.DISPATCH_MAX_TEMPORAL_BACKLOG
        self.temporal_backlog = 0  # workflow tasks waiting on the task queue (Temporal's estimate)
        self.linger = settings.DISPATCH_LINGER_MS / 1000
        self._signalled: dict[str, float] = {}  # workflow id -> monotonic time of its last delivery
        self._linger_until: float | None = None  # when the first row put off is due again
        # Set at start to what the worker's first task reports (rules/workflow_contract.build_ids).
        self._build_ids = SearchAttributePair(SearchAttributeKey.for_keyword_list(SA_BUILD_IDS),
                                              build_ids(settings.worker_build_id))

    # --- statistics -------------------------------------------------------------------------------

    def rate_per_s(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        window = min(RATE_WINDOW_S, max(1.0, now - self._started))
        return sum(n for _, n in self._recent) / window

    def lag_percentiles_ms(self) -> tuple[float | None, float | None]:
        values = sorted(self._lags_ms)
        return _percentile(values, 50), _percentile(values, 95)

    def stats(self) -> dict[str, Any]:
        p50, p95 = self.lag_percentiles_ms()
        return {"dispatcher_id": self.id, "delivered": self.delivered, "dropped": self.dropped,
                "failed": self.failed, "eager_started": self.eager_started, "rate_per_s": self.rate_per_s(),
                "lag_p50_ms": p50, "lag_p95_ms": p95, "temporal_ok": self.temporal_ok, "listening": self.listening}

    async def write_stats(self) -> None:
        p50, p95 = self.lag_percentiles_ms()
        async with self.db.connection() as conn:
            await notice_dispatch.record_stats(conn, self.id, delivered=self.delivered, failed=self.failed,
                                        rate_per_s=self.rate_per_s(), lag_p50_ms=p50, lag_p95_ms=p95,
                                        temporal_ok=self.temporal_ok, lags=self.lags)

    async def retire(self) -> None:
        """On a clean stop: this dispatcher's totals go to the retired totals, its row away (so
        /ready counts running dispatchers only)."""
        p50, p95 = self.lag_percentiles_ms()
        async with self.db.transaction() as conn:
            await notice_dispatch.record_stats(conn, self.id, delivered=self.delivered, failed=self.failed,
                                        rate_per_s=self.rate_per_s(), lag_p50_ms=p50, lag_p95_ms=p95,
                                        temporal_ok=self.temporal_ok, lags=self.lags)
            await notice_dispatch.retire(conn, [self.id])

    # --- one delivery -----------------------------------------------------------------------------

    def _start_options(self, row: dict[str, Any], timeout: float) -> dict[str, Any]:
        """What every start of the row's workflow names: id, task queue, search attributes, summary."""
        attrs: list[SearchAttributePair[Any]] = [
            SearchAttributePair(SearchAttributeKey.for_keyword(k), str(v))
            for k, v in (row["search_attributes"] or {}).items() if v is not None]
        attrs.append(self._build_ids)
        return {"id": row["workflow_id"], "task_queue": row.get("task_queue") or self.task_queue,
                "search_attributes": TypedSearchAttributes(attrs), "static_summary": row["summary"] or None,
                "rpc_timeout": timedelta(seconds=timeout)}

    async def _deliver(self, rows: list[dict[str, Any]], timeout: float) -> Outcome:
        """Consecutive rows of one workflow in one RPC. Rows opening a workflow (its `created`
        notice first) start it with them in its input (`opening`), eagerly where a worker
        shares this client; otherwise, and when that workflow exists already, signal-with-start:
        the row's own signal when alone, else one `notices` signal carrying them all in order."""
        if self.client is None:
            return Outcome(False, unreachable=True, error="no Temporal client")
        row = rows[0]
        items = [{"signal": r["signal"], "notice": r["payload"]} for r in rows]
        if len(rows) == 1:
            signal, args = row["signal"], [row["payload"]]
        else:
            signal, args = NOTICES, [items]
        common = self._start_options(row, timeout)
        try:
            if row["signal"] in OPENING_SIGNALS:
                # A start whose answer carries the first workflow task (when a worker of this client
                # has a free slot) costs Temporal one write fewer than signal-with-start and saves
                # matching a dispatch. The conflict policy is FAIL: a workflow that exists already
                # (a sync started it, or it completed) is left to signal-with-start below.
                try:
                    handle = await asyncio.wait_for(self.client.start_workflow(
                        row["workflow_type"], {**row["start_args"], "opening": items}, request_eager_start=True,
                        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY, **common),
                        timeout + 0.5)
                    self.eager_started += bool(getattr(handle, "__temporal_eagerly_started", False))
                    return DELIVERED
                except WorkflowAlreadyStartedError:
                    pass
            # Signal-with-start: signals the running workflow, or starts it with `start_args` and
            # then signals it. The conflict policy is left unset: for signal-with-start the server
            # treats it as USE_EXISTING (FAIL is rejected as invalid). ALLOW_DUPLICATE_FAILED_ONLY:
            # a workflow that completed normally (its entity is terminal) is not started again by a
            # late notice. The reconciler's `sync` is the exception: it found the row live and no
            # workflow running (e.g. a restored backup), so it may start a new run; were the row
            # ended meanwhile, that run settles from the row and ends.
            await asyncio.wait_for(self.client.start_workflow(
                row["workflow_type"], row["start_args"], start_signal=signal, start_signal_args=args,
                id_reuse_policy=(WorkflowIDReusePolicy.ALLOW_DUPLICATE if row["signal"] == SYNC
                                 else WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY),
                **common), timeout + 0.5)
            return DELIVERED
        except WorkflowAlreadyStartedError:
            return DROPPED  # completed normally: nothing more to tell it
        except RPCError as exc:
            return Outcome(False, unreachable=exc.status in _UNREACHABLE,
                           error=f"{exc.status.name if exc.status else 'RPCError'}: {exc.message}")
        except TimeoutError:
            # The SDK retries UNAVAILABLE internally for up to 10 s; the deadline cut it short.
            return Outcome(False, unreachable=True, error=f"no answer from Temporal within {timeout:.1f} s")
        except RuntimeError as exc:  # the SDK's core: "Failed client connect: ..."
            text = str(exc)
            return Outcome(False, unreachable="connect" in text.lower(), error=f"RuntimeError: {text}")
        except Exception as exc:  # noqa: BLE001 — any other failure is this row's, retried with backoff
            return Outcome(False, error=f"{type(exc).__name__}: {exc}")

    async def _deliver_chain(self, chain: list[dict[str, Any]], deadline: float, timeout: float
                             ) -> list[tuple[dict[str, Any], Outcome]]:
        """The rows of one workflow (seq order) in one delivery; a `sync` row goes alone, first, since
        it may start a new run where the others may not."""
        groups = [chain[:1], chain[1:]] if chain[0]["signal"] == SYNC and len(chain) > 1 else [chain]
        done: list[tuple[dict[str, Any], Outcome]] = []
        for group in groups:
            async with self._sem:
                if time.monotonic() >= deadline:
                    break
                outcome = await self._deliver(group, timeout)
            if not outcome.delivered:
                # The failure is the head's: it backs off; the rows behind it stay as they are (they
                # cannot be claimed before it is delivered).
                done.append((group[0], outcome))
                break
            done += [(row, outcome) for row in group]
            if self.linger:  # remembered only to linger on it (pruned by `_put_off_hot`)
                self._signalled[group[0]["workflow_id"]] = time.monotonic()
            if not outcome.dropped:
                now = datetime.now(timezone.utc)
                for row in group:
                    lag_s = max(0.0, (now - row["created_at"]).total_seconds())
                    self._lags_ms.append(lag_s * 1000)
                    self.lags.observe(lag_s)
        return done

    def _put_off_hot(self, chains: dict[str, list[dict[str, Any]]]) -> tuple[list[notice_dispatch.Deferral], int]:
        """Take out of `chains` the workflows signalled less than `linger` ago (a `sync` head goes
        at once) and put their head rows off until then: the rows behind a head cannot be claimed
        before it, so they all go together once it is due. The heads' deferrals, and how many rows
        were taken out."""
        if not self.linger:
            return [], 0
        now = time.monotonic()
        self._signalled = {w: t for w, t in self._signalled.items() if now - t < self.linger}
        heads, rows = [], 0
        for workflow_id, chain in list(chains.items()):
            signalled = self._signalled.get(workflow_id)
            if signalled is None or chain[0]["signal"] == SYNC:
                continue
            del chains[workflow_id]
            wait = self.linger - (now - signalled)
            heads.append(notice_dispatch.Deferral(chain[0]["seq"], wait, None, count_attempt=False))
            rows += len(chain)
            due = now + wait
            self._linger_until = due if self._linger_until is None else min(self._linger_until, due)
        return heads, rows

    def _next_pause(self) -> float:
        """How long to wait for a notification before claiming again: the poll interval, or less
        when a row put off by the linger is due sooner."""
        if self._linger_until is None:
            return self.poll_interval
        left = self._linger_until - time.monotonic()
        if left <= 0:
            self._linger_until = None
            return 0.0
        return min(self.poll_interval, left)

    # --- one batch --------------------------------------------------------------------------------

    async def deliver_batch(self) -> BatchResult:
        """Claim, deliver, settle, commit. Raises on a Postgres failure (nothing is lost: the
        transaction rolls back and the rows are claimed again)."""
        probing = not self.temporal_ok
        limit = 1 if probing else self.batch_size
        timeout = min(self.rpc_timeout, PROBE_TIMEOUT_S) if probing else self.rpc_timeout
        result = BatchResult()
        # A cascade's notices come as one fan-out row: spread first, committed at once (until then it
        # holds back every later row, for every dispatcher).
        await notice_dispatch.spread_fanouts(self.db, self.task_queue, self.batch_size)
        async with self.db.transaction() as conn:
            held_back = bool(self.max_temporal_backlog) and self.temporal_backlog > self.max_temporal_backlog
            rows = await notice_dispatch.claim(conn, limit, self.per_workflow, self.task_queue, due_soon_only=held_back)
            result.claimed = len(rows)
            if not rows:
                return result
            chains: dict[str, list[dict[str, Any]]] = {}
            for row in rows:  # seq order within each workflow
                chains.setdefault(row["workflow_id"], []).append(row)
            lingering, result.lingering = self._put_off_hot(chains)
            # A slow Temporal must not hold the locks for chain length x RPC deadline: past this
            # deadline no new delivery starts; the rest stays for the next batch.
            deadline = time.monotonic() + 2 * timeout
            attempted = [pair for done in await asyncio.gather(
                *(self._deliver_chain(chain, deadline, timeout) for chain in chains.values())) for pair in done]
            answered = any(o.delivered or not o.unreachable for _, o in attempted)
            down = bool(attempted) and not answered
            delivered = [row["seq"] for row, o in attempted if o.delivered]
            deferrals = self._deferrals(attempted, down)
            await notice_dispatch.delete_delivered(conn, delivered)
            await notice_dispatch.defer(conn, deferrals + lingering)
        # Committed.
        result.delivered = len(delivered)
        result.dropped = sum(1 for _, o in attempted if o.dropped)
        result.failed = len(deferrals)
        result.skipped = result.claimed - len(attempted) - result.lingering
        result.errors = [d.error or "" for d in deferrals]
        if attempted:
            result.temporal_ok = not down
            if self.temporal_ok != result.temporal_ok:
                if down:
                    log.warning("temporal unreachable (%s); rows wait, probing every %.1f s",
                                deferrals[0].error if deferrals else "?", self._probe_interval())
                else:
                    log.info("temporal reachable again; delivering")
            self.temporal_ok = result.temporal_ok
        self.delivered += result.delivered
        self.dropped += result.dropped
        self.failed += result.failed
        if result.delivered:
            self._recent.append((time.monotonic(), result.delivered))
        if deferrals and not down:
            log.warning("workflow outbox: %d row(s) deferred, e.g. %s", len(deferrals), deferrals[0].error)
        return result

    def _deferrals(self, attempted: list[tuple[dict[str, Any], Outcome]], down: bool
                   ) -> list[notice_dispatch.Deferral]:
        """The rows not delivered, to try again: with backoff, or where they were while Temporal did
        not answer at all (the row keeps its place and its attempts)."""
        return [notice_dispatch.Deferral(row["seq"], 0.0, o.error, count_attempt=False) if down else
                notice_dispatch.Deferral(row["seq"], backoff_seconds(row["attempts"], self.max_backoff), o.error,
                                         count_attempt=True)
                for row, o in attempted if not o.delivered]

    def _probe_interval(self) -> float:
        return min(PROBE_INTERVAL_S, self.poll_interval)

    # --- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set. Never raises for a Postgres or Temporal outage."""
        log.info("dispatcher %s: delivering the workflow outbox (task queue %s) to Temporal",
                 self.id, self.task_queue)
        listener = asyncio.create_task(self._listen(stop), name=f"dispatcher-listen-{self.id}")
        stats = asyncio.create_task(self._stats_loop(stop), name=f"dispatcher-stats-{self.id}")
        backlog = asyncio.create_task(self._watch_temporal_backlog(stop), name=f"dispatcher-backlog-{self.id}")
        pg_backoff = 0.5
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    result = await self.deliver_batch()
                    pg_backoff = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 — Postgres down, statement timeout, ...
                    log.warning("dispatcher: batch failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, exc, pg_backoff)
                    await self._pause(stop, pg_backoff, wake=False)
                    pg_backoff = min(pg_backoff * 2, 5.0)
                    continue
                self._touch_health_file()
                if not self.temporal_ok:
                    await self._pause(stop, self._probe_interval(), wake=False)
                elif result.delivered == 0:
                    await self._pause(stop, self._next_pause(), wake=True)
                # else: progress; claim again at once (the outbox may hold more)
        finally:
            for task in (listener, stats, backlog):
                task.cancel()
            await asyncio.gather(listener, stats, backlog, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.retire(), 5)
            log.info("dispatcher %s stopped: %d delivered (%d dropped), %d failed", self.id, self.delivered,
                     self.dropped, self.failed)

    async def drain(self, timeout: float = 30.0) -> int:
        """Deliver until no row is left for this dispatcher's task queue; return how many rows were
        delivered. Raises TimeoutError if rows are still there after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            result = await self.deliver_batch()
            total += result.delivered
            if result.claimed == 0 and await notice_dispatch.pending(self.db, self.task_queue) == 0:
                return total
            if time.monotonic() >= deadline:
                left = await notice_dispatch.pending(self.db, self.task_queue)
                raise TimeoutError(f"workflow outbox not drained within {timeout} s: {left} row(s) left"
                                   + (f", last error {result.errors[-1]!r}" if result.errors else ""))
            if not self.temporal_ok:
                await asyncio.sleep(min(0.2, self._probe_interval()))
            elif result.delivered == 0:
                await asyncio.sleep(0.05)

    async def _pause(self, stop: asyncio.Event, seconds: float, *, wake: bool) -> None:
        """Sleep up to `seconds`; return early when stopping or (if `wake`) on a notification."""
        events = [stop.wait()] + ([self._wake.wait()] if wake else [])
        tasks = [asyncio.ensure_future(e) for e in events]
        try:
            await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def _listen(self, stop: asyncio.Event) -> None:
        """Keep a LISTEN connection; set the wake event on every notification and on (re)connect."""

        def lost(exc: Exception) -> None:
            if self.listening:
                log.warning("dispatcher: LISTEN connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
            else:
                log.debug("dispatcher: cannot LISTEN yet (%s)", exc)
            self.listening = False

        def connected() -> None:
            self.listening = True
            self._wake.set()  # anything committed while we were not listening

        listener = ChannelListener(self.db.url, NOTIFY_CHANNEL, on_notify=lambda _: self._wake.set(),
                                   on_connect=connected, on_lost=lost)
        task = asyncio.create_task(listener.run(), name=f"dispatcher-listener-{self.id}")
        try:
            await stop.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.listening = False

    async def _watch_temporal_backlog(self, stop: asyncio.Event) -> None:
        """Every BACKLOG_POLL_S: how many workflow tasks wait on the task queue (backpressure)."""
        if self.client is None or not self.max_temporal_backlog:
            return
        while not stop.is_set():
            try:
                backlog = await workflow_task_backlog(self.client, self.task_queue)
                was_holding = self.temporal_backlog > self.max_temporal_backlog
                self.temporal_backlog = backlog
                if was_holding != (backlog > self.max_temporal_backlog):
                    # Debug only: under a steady load this flips several times a second.
                    log.debug("temporal workflow-task backlog %d: %s", backlog,
                              "delivering everything again" if was_holding else "holding back rows not due soon")
                    if was_holding:
                        self._wake.set()  # the rows held back go now, not at the next poll
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — Temporal away: the delivery path notices that itself
                self.temporal_backlog = 0
            await self._pause(stop, BACKLOG_POLL_S, wake=False)

    def _touch_health_file(self) -> None:
        """DISPATCH_HEALTH_FILE: touched (at most every 5 s) while batches complete; a container
        healthcheck tests its age."""
        path = self.settings.DISPATCH_HEALTH_FILE
        now = time.monotonic()
        if path and now - self._health_touched >= 5:
            self._health_touched = now
            with contextlib.suppress(OSError):
                with open(path, "a"):
                    os.utime(path)

    async def _stats_loop(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(Exception):  # dispatchers that crashed long ago
            async with self.db.transaction() as conn:
                await notice_dispatch.retire(conn, silent_for_seconds=RETIRE_SILENT_S)
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.write_stats(), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — Postgres away: the next write catches up
                log.debug("dispatcher: stats not written (%s)", exc)
            await self._pause(stop, STATS_INTERVAL_S, wake=False)
