"""Prometheus series: requests by route template, workflow/activity outcomes, sessions by status."""

from __future__ import annotations

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("coordinator_http_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("coordinator_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    registry=REGISTRY,
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
WORKFLOW_COMMANDS = Counter("coordinator_workflow_commands_total", "Workflow updates sent by the API",
                            ["command", "outcome"], registry=REGISTRY)
SESSIONS = Gauge("coordinator_sessions", "Sessions by status", ["status"], registry=REGISTRY)
INVOCATIONS = Gauge("caracal_invocations_total", "Invocations by status (current row count)", ["status"],
                    registry=REGISTRY)
OUTBOX = Gauge("caracal_outbox_total", "Coordinator outbox rows by status", ["status"], registry=REGISTRY)
ACTIVITY_ROWS = Gauge("coordinator_workflow_executions", "Workflow executions by type and status (Temporal)",
                      ["workflow_type", "status"], registry=REGISTRY)


def route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def observe_request(request: Request, status: int, seconds: float) -> None:
    route = route_template(request)
    REQUESTS.labels(request.method, route, str(status)).inc()
    LATENCY.labels(request.method, route).observe(seconds)


def render() -> bytes:
    return generate_latest(REGISTRY)
