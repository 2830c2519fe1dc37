"""Liveness, readiness and metrics (operator token).

`/ready` fails (503) only for what commands need: Postgres (and Redis when the relay is
configured). Temporal and the worker are reported, not required: commands are Postgres
transactions and reach the workflows through the workflow outbox, which waits while Temporal is
away (docs/DESIGN.md, "Postgres decides, Temporal follows"). The body names the outbox backlog and
Temporal's state as the dispatchers and this API see it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from api import metrics
from api.deps import Caller, Services, ServicesDep
from api.routes.common import error_responses, make_router
from rules.errors import CoordinatorError
from rules.lifecycle import SESSION_STATUSES
from storage import notice_dispatch
from storage import stats as stats_store

# Public routes answer only the rate limits (and /ready its 503); /metrics and /stats document their own.
router = make_router("health", statuses=(429,))
log = logging.getLogger("coordinator.api")

READY_TIMEOUT_S = 5.0
# Temporal is only reported by /ready: do not let a dead server slow the answer down.
TEMPORAL_PROBE_TIMEOUT_S = 2.0


@router.get("/health", summary="Liveness check")
async def health() -> dict[str, Any]:
    return {"ok": True}


async def _postgres(svc: Services) -> None:
    await stats_store.ping(svc.db)


async def _temporal(svc: Services) -> bool:
    """True when at least one worker polls the workflow task queue."""
    client = svc.temporal
    if client is None:
        raise ConnectionError("no temporal client")
    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=svc.settings.TEMPORAL_TASK_QUEUE),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW), timeout=timedelta(seconds=TEMPORAL_PROBE_TIMEOUT_S))
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


async def _outbox(svc: Services) -> tuple[dict[str, Any], dict[str, Any]]:
    return await asyncio.gather(notice_dispatch.backlog(svc.db), notice_dispatch.dispatch_stats(svc.db))


class ReadyAnswer(BaseModel):
    """`{"ok": false, "error", "dependency"}` or `{"ok": false, "draining": true}`."""

    model_config = ConfigDict(extra="allow")

    ok: bool


@router.get("/ready", summary="Dependency readiness",
            responses={503: {"model": ReadyAnswer, "description": "A dependency is down, or the process is draining"}})
async def ready(request: Request, svc: ServicesDep) -> Response:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"ok": False, "draining": True}, status_code=503)
    pg, tp, rd, ob = await asyncio.gather(asyncio.wait_for(_postgres(svc), READY_TIMEOUT_S),
                                          asyncio.wait_for(_temporal(svc), TEMPORAL_PROBE_TIMEOUT_S + 0.5),
                                          asyncio.wait_for(_redis(svc), READY_TIMEOUT_S),
                                          asyncio.wait_for(_outbox(svc), READY_TIMEOUT_S), return_exceptions=True)
    if isinstance(pg, BaseException) or isinstance(ob, BaseException):
        if not isinstance(pg, BaseException):
            log.warning("/ready: workflow outbox state unreadable: %r", ob)
        return JSONResponse({"ok": False, "error": "postgres_unreachable", "dependency": "postgres"}, status_code=503)
    if isinstance(rd, BaseException):
        return JSONResponse({"ok": False, "error": "redis_unreachable", "dependency": "redis"}, status_code=503)
    backlog, stats = ob
    # Temporal is "ok" when this API reaches it and no running dispatcher reports it unreachable.
    temporal_ok = not isinstance(tp, BaseException) and stats["temporal_ok"] is not False
    return JSONResponse({
        "ok": True,
        "worker": "unknown" if isinstance(tp, BaseException) else "polling" if tp else "not_polling",
        "workflow_outbox": {
            "backlog": backlog["backlog"],
            "oldest_age_seconds": round(backlog["oldest_age_seconds"], 3),
            "delivered_per_second": round(stats["delivered_per_second"], 2),
            "dispatchers": stats["dispatchers"],
            "temporal": "ok" if temporal_ok else "unreachable",
            # Still ready while the workflows lag (Postgres decides; they catch up): says so.
            "following": ("behind" if backlog["oldest_age_seconds"] > svc.settings.FOLLOW_LAG_TARGET_SECONDS
                          else "keeping_up"),
            "lag_p95_ms": None if stats["lag_p95_ms"] is None else round(stats["lag_p95_ms"], 1),
        },
    })


OPERATOR_ERRORS = error_responses(401, 403, 503)


@router.get("/metrics", summary="Service metrics (Prometheus text, operator token)", response_class=Response,
            responses={**OPERATOR_ERRORS, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                "description": "Prometheus text format 0.0.4"}})
async def metrics_endpoint(request: Request, ident: Caller, svc: ServicesDep) -> Response:
    bearer = svc.settings.METRICS_BEARER
    if bearer and request.headers.get("authorization") != f"Bearer {bearer}":
        raise CoordinatorError(401, "unauthorized")
    if not bearer and svc.settings.CARACAL_MODE != "dev":  # published modes need an explicit bearer
        raise CoordinatorError(401, "unauthorized")
    sessions = await stats_store.count_by_status(svc.db, "sessions")
    for status in SESSION_STATUSES:
        metrics.SESSIONS.labels(status).set(sessions.get(status, 0))
    for status, n in (await stats_store.count_by_status(svc.db, "invocations")).items():
        metrics.INVOCATIONS.labels(status).set(n)
    for status, n in (await stats_store.count_by_status(svc.db, "outbox")).items():
        metrics.OUTBOX.labels(status).set(n)
    backlog, stats = await _outbox(svc)
    metrics.set_workflow_outbox(backlog, stats, await notice_dispatch.counter(svc.db, "reconciler_started"),
                                await notice_dispatch.counter(svc.db, "reconciler_quiet_runs"))
    body = metrics.render() + metrics.follow_lag_text(await notice_dispatch.lag_histogram(svc.db))
    return Response(body, media_type="text/plain; version=0.0.4")


@router.get("/stats", summary="Operational counters (operator token)", responses=OPERATOR_ERRORS)
async def stats(ident: Caller, svc: ServicesDep) -> dict[str, Any]:
    counts = {kind: await stats_store.count_by_status(svc.db, kind) for kind in stats_store.STATUS_TABLES}
    return {**counts, "idempotency": await stats_store.idempotency_receipts(svc.db)}
