"""The Temporal worker: hosts the workflows and the activities (which own the Postgres pool).

Run: `python worker.py` (settings from the environment, see settings.py).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

import entrypoint
from settings import Settings, get_settings

log = logging.getLogger("coordinator.worker")


def build_activities(db, settings: Settings, client: Client) -> list:
    """The deadline settlements of the session and invocation timers, and maintenance (the
    reconciler in it starts missing workflows through `client`). Commands are API transactions."""
    from activities.invocations import InvocationActivities
    from activities.maintenance import MaintenanceActivities
    from activities.sessions import SessionActivities

    sessions = SessionActivities(db, settings)
    invocations = InvocationActivities(db, settings)
    maintenance = MaintenanceActivities(db, settings, client)
    return [sessions.settle_session_deadline, invocations.settle_invocation_deadline, maintenance.run_maintenance]


def build_workflows() -> list:
    from workflows.invocation import InvocationWorkflow
    from workflows.maintenance import MaintenanceWorkflow
    from workflows.session import SessionWorkflow

    return [SessionWorkflow, InvocationWorkflow, MaintenanceWorkflow]


def precompile_workflows() -> None:
    """Write .pyc files for the workflow modules.

    The sandbox imports a workflow's module afresh for every new workflow run; where bytecode is
    not written at import time (PYTHONDONTWRITEBYTECODE, read-only images) that means compiling the
    source each time, a large share of the worker's CPU per session create.
    """
    import compileall
    from pathlib import Path

    compileall.compile_dir(Path(__file__).resolve().parent / "workflows", quiet=1)


def build_worker(client: Client, db, settings: Settings, task_queue: str | None = None) -> Worker:
    precompile_workflows()
    runner: dict[str, Any] = {}
    if not settings.WORKFLOW_SANDBOX:
        # The workflows import only temporalio, the standard library and workflows/models.py (the
        # replay tests guard determinism); without the sandbox a new workflow costs ~18 ms less CPU.
        from temporalio.worker import UnsandboxedWorkflowRunner

        runner = {"workflow_runner": UnsandboxedWorkflowRunner()}
    return Worker(
        client,
        **runner,
        task_queue=task_queue or settings.TEMPORAL_TASK_QUEUE,
        build_id=settings.worker_build_id,  # what the dispatcher's starts expect (settings.WORKER_BUILD_ID)
        workflows=build_workflows(),
        activities=build_activities(db, settings, client),
        max_cached_workflows=settings.WORKER_MAX_CACHED_WORKFLOWS,
        max_concurrent_activities=100,
        max_concurrent_local_activities=100,
        # A worker killed with -9 leaves tasks on its sticky queue; hand them to the shared queue
        # quickly so timers that fell due while it was down settle within seconds of a restart.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=settings.STICKY_QUEUE_TIMEOUT_SECONDS),
    )


def maintenance_schedule_id(settings: Settings) -> str:
    return f"maintenance/{settings.TEMPORAL_TASK_QUEUE}"


async def ensure_maintenance_schedule(client: Client, settings: Settings) -> None:
    """Create (or update) the Schedule that starts the maintenance workflow every few seconds."""
    from temporalio.client import (
        Schedule, ScheduleActionStartWorkflow, ScheduleAlreadyRunningError, ScheduleIntervalSpec,
        ScheduleOverlapPolicy, SchedulePolicy, ScheduleSpec, ScheduleUpdate,
    )

    from workflows.maintenance import MaintenanceWorkflow

    schedule = Schedule(
        action=ScheduleActionStartWorkflow(MaintenanceWorkflow.run, id=f"maintenance/{settings.TEMPORAL_TASK_QUEUE}",
                                           task_queue=settings.TEMPORAL_TASK_QUEUE),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.MAINTENANCE_INTERVAL_SECONDS))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP))
    try:
        await client.create_schedule(maintenance_schedule_id(settings), schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(maintenance_schedule_id(settings))
        await handle.update(lambda _: ScheduleUpdate(schedule=schedule))


def telemetry_runtime(settings: Settings):
    """The SDK's own Prometheus metrics (workflow and activity outcomes, latencies, slots)."""
    if not settings.WORKER_METRICS_ADDRESS:
        return None
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=settings.WORKER_METRICS_ADDRESS)))


async def connect_temporal(settings: Settings, attempts: int = 60) -> Client:
    runtime = telemetry_runtime(settings)
    for attempt in range(attempts):
        try:
            return await Client.connect(settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE,
                                        **({"runtime": runtime} if runtime else {}))
        except Exception as exc:  # the server may still be starting
            if attempt == attempts - 1:
                raise
            log.warning("temporal not reachable yet (%s); retrying", exc)
            await asyncio.sleep(1)
    raise RuntimeError("unreachable")


async def start_dispatchers(client: Client, settings: Settings, stop: asyncio.Event) -> tuple[Any, list]:
    """WORKER_DISPATCHERS dispatchers on the worker's client (so their starts can be eager), with a
    pool of their own: their batch transactions stay open while they deliver."""
    if not settings.WORKER_DISPATCHERS:
        return None, []
    from notices.dispatcher import Dispatcher
    from storage.db import Database

    db = Database(settings.DATABASE_URL, max_size=4 * settings.WORKER_DISPATCHERS,
                  statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS,
                  connect_timeout_s=min(2.0, settings.DB_CONNECTION_TIMEOUT_MS / 1000))
    await db.open(wait=False)
    tasks = [asyncio.create_task(Dispatcher(db, client, settings).run(stop), name=f"dispatcher-{i}")
             for i in range(settings.WORKER_DISPATCHERS)]
    log.info("worker: %d dispatcher(s) delivering the workflow outbox", len(tasks))
    return db, tasks


async def main() -> None:
    from storage.db import Database
    from storage.migrate import require_migrated

    settings = get_settings()
    require_migrated(settings.DATABASE_URL, "worker")
    # Short pool timeout: a command's activity attempt should fail fast while Postgres is down.
    db = Database(settings.DATABASE_URL, max_size=settings.DB_POOL_MAX, task_queue=settings.TEMPORAL_TASK_QUEUE,
                  statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS,
                  connect_timeout_s=min(2.0, settings.DB_CONNECTION_TIMEOUT_MS / 1000))
    await db.open()
    client = await connect_temporal(settings)
    worker = build_worker(client, db, settings)
    await ensure_maintenance_schedule(client, settings)
    stop = entrypoint.stop_event()
    log.info("worker polling task queue %s on %s", settings.TEMPORAL_TASK_QUEUE, settings.TEMPORAL_ADDRESS)
    publisher = None
    if settings.REDIS_URL:  # outbox → Redis Streams (feed/relay.py)
        from feed.relay import OutboxPublisher

        publisher = asyncio.create_task(OutboxPublisher(db, settings).run(stop))
    dispatch_db, dispatchers = await start_dispatchers(client, settings, stop)
    async with worker:
        await stop.wait()
        # The batches in flight finish (their eager starts need this worker) before it shuts down.
        if dispatchers:
            await asyncio.wait(dispatchers, timeout=4 * settings.DISPATCH_RPC_TIMEOUT_SECONDS)
    if dispatch_db is not None:
        await dispatch_db.close()
    if publisher is not None:
        await asyncio.wait({publisher}, timeout=5)
    await db.close()


if __name__ == "__main__":
    entrypoint.run(main, hard_exit=True)
