"""Liveness, readiness (Postgres, Temporal and a polling worker) and metrics (operator token)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from api import metrics
from api.deps import Services, identity, services
from rules.errors import CoordinatorError

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 5.0


@router.get("/health", summary="Liveness check")
async def health() -> dict[str, Any]:
    return {"ok": True}


async def _postgres(svc: Services) -> None:
    await svc.db.fetchval("SELECT 1")


async def _temporal(svc: Services) -> bool:
    """True when at least one worker polls the workflow task queue."""
    client = svc.temporal.client
    if client is None:
        raise ConnectionError("no temporal client")
    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=svc.settings.TEMPORAL_TASK_QUEUE),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW), timeout=__import__("datetime").timedelta(seconds=READY_TIMEOUT_S))
    return len(resp.pollers) > 0


async def _redis(svc: Services) -> None:
    """Only when the Redis Streams relay is configured (REDIS_URL)."""
    if not svc.settings.REDIS_URL:
        return
    import redis.asyncio as redis

    client = redis.from_url(svc.settings.REDIS_URL, socket_timeout=READY_TIMEOUT_S,
                            socket_connect_timeout=READY_TIMEOUT_S)
    try:
        if await client.ping() is not True:
            raise ConnectionError("redis did not answer PONG")
    finally:
        await client.aclose()


@router.get("/ready", summary="Dependency readiness")
async def ready(request: Request, svc: Services = Depends(services)) -> Response:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"ok": False, "draining": True}, status_code=503)
    pg, tp, rd = await asyncio.gather(asyncio.wait_for(_postgres(svc), READY_TIMEOUT_S),
                                      asyncio.wait_for(_temporal(svc), READY_TIMEOUT_S),
                                      asyncio.wait_for(_redis(svc), READY_TIMEOUT_S), return_exceptions=True)
    if isinstance(pg, BaseException):
        return JSONResponse({"ok": False, "error": "postgres_unreachable", "dependency": "postgres"}, status_code=503)
    if isinstance(rd, BaseException):
        return JSONResponse({"ok": False, "error": "redis_unreachable", "dependency": "redis"}, status_code=503)
    if isinstance(tp, BaseException):
        return JSONResponse({"ok": False, "error": "temporal_unreachable", "dependency": "temporal"}, status_code=503)
    if not tp:
        return JSONResponse({"ok": False, "error": "worker_not_polling", "dependency": "worker"}, status_code=503)
    return JSONResponse({"ok": True})


@router.get("/metrics", summary="Service metrics (Prometheus text)")
async def metrics_endpoint(request: Request, svc: Services = Depends(services)) -> Response:
    await identity(request)
    bearer = svc.settings.METRICS_BEARER
    if bearer and request.headers.get("authorization") != f"Bearer {bearer}":
        raise CoordinatorError(401, "unauthorized")
    if not bearer and svc.settings.CARACAL_MODE != "dev":  # published modes need an explicit bearer
        raise CoordinatorError(401, "unauthorized")
    rows = await svc.db.fetch("SELECT status, count(*) AS n FROM sessions GROUP BY status")
    for status in ("active", "suspended", "terminated", "expired"):
        metrics.SESSIONS.labels(status).set(next((r["n"] for r in rows if r["status"] == status), 0))
    rows = await svc.db.fetch("SELECT status, count(*) AS n FROM agent_invocations GROUP BY status")
    for r in rows:
        metrics.INVOCATIONS.labels(r["status"]).set(r["n"])
    rows = await svc.db.fetch("SELECT status, count(*) AS n FROM caracal_outbox GROUP BY status")
    for r in rows:
        metrics.OUTBOX.labels(r["status"]).set(r["n"])
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/stats", summary="Operational counters (operator token)")
async def stats(request: Request, svc: Services = Depends(services)) -> dict[str, Any]:
    await identity(request)

    async def by_status(table: str) -> dict[str, int]:
        rows = await svc.db.fetch(f"SELECT status, count(*) AS n FROM {table} GROUP BY status ORDER BY status")
        return {r["status"]: r["n"] for r in rows}

    receipts = await svc.db.fetchrow("""SELECT count(*) AS rows,
                                               COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) AS oldest
                                        FROM coordinator_idempotency_receipts WHERE expires_at > now()""")
    return {"sessions": await by_status("sessions"), "invocations": await by_status("agent_invocations"),
            "outbox": await by_status("caracal_outbox"), "delegations": await by_status("delegation_edges"),
            "idempotency": {"rows": receipts["rows"], "oldestSeconds": int(receipts["oldest"])}}
