"""Prometheus series: requests by route template, workflow/activity outcomes, sessions by status,
the workflow outbox and its dispatchers.

With several API processes (api/server.py sets PROMETHEUS_MULTIPROC_DIR for them) the series live in
shared files, so a scrape answered by any one process reports the whole API: counters and
histograms summed over the processes, the gauges (read from Postgres at each scrape) as last set.
"""

from __future__ import annotations

import os

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from storage.notice_dispatch import LAG_BUCKETS_S, LagHistogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("coordinator_http_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("coordinator_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    registry=REGISTRY,
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    """A gauge set from Postgres at each scrape: across API processes the last value set counts."""
    return Gauge(name, documentation, labels, registry=REGISTRY, multiprocess_mode="mostrecent")


SESSIONS = _gauge("coordinator_sessions", "Sessions by status", ("status",))
INVOCATIONS = _gauge("caracal_invocations_total", "Invocations by status (current row count)", ("status",))
OUTBOX = _gauge("caracal_outbox_total", "Coordinator outbox rows by status", ("status",))

# The workflow outbox and its dispatchers (storage/notice_dispatch.py), read from Postgres at each scrape.
WF_OUTBOX_BACKLOG = _gauge("coordinator_workflow_outbox_backlog", "Workflow-outbox rows waiting for delivery")
WF_OUTBOX_OLDEST = _gauge("coordinator_workflow_outbox_oldest_age_seconds",
                          "Age of the oldest undelivered workflow-outbox row")
WF_OUTBOX_DELIVERED = _gauge("coordinator_workflow_outbox_delivered_total",
                             "Workflow-outbox rows delivered, summed over all dispatchers")
WF_OUTBOX_FAILED = _gauge("coordinator_workflow_outbox_failed_total",
                          "Failed workflow-outbox deliveries (retried), summed over all dispatchers")
WF_OUTBOX_RATE = _gauge("coordinator_workflow_outbox_delivered_per_second",
                        "Rows delivered per second by the running dispatchers (last 10 s)")
WF_OUTBOX_DISPATCHERS = _gauge("coordinator_workflow_outbox_dispatchers", "Running dispatchers (recent heartbeat)")
WF_OUTBOX_TEMPORAL_UP = _gauge("coordinator_workflow_outbox_temporal_up",
                               "1 when every running dispatcher reaches Temporal")
WF_SIGNAL_LAG_P50 = _gauge("coordinator_workflow_signal_lag_p50_ms",
                           "Commit-to-signal lag, median of the recent deliveries (worst dispatcher)")
WF_SIGNAL_LAG_P95 = _gauge("coordinator_workflow_signal_lag_p95_ms",
                           "Commit-to-signal lag, 95th percentile of the recent deliveries (worst dispatcher)")
RECONCILER_STARTED = _gauge("coordinator_reconciler_started_total",
                            "Workflows the reconciler found missing and started")
RECONCILER_QUIET = _gauge("coordinator_reconciler_quiet_runs_total",
                          "Reconciler runs that started nothing because the dispatchers or Temporal were behind "
                          "or Temporal was unreachable")


def follow_lag_text(lags: LagHistogram) -> bytes:
    """`coordinator_follow_lag_seconds`: the running dispatchers' histograms, read from Postgres at
    the scrape (so it is rendered here, not kept by this process)."""
    family = HistogramMetricFamily(
        "coordinator_follow_lag_seconds",
        "Commit of a command to its notice's signal recorded in the workflow's history (every delivery "
        "by the running dispatchers since they started)")
    cumulative, buckets = 0, []
    for bound, n in zip((*LAG_BUCKETS_S, float("inf")), lags.buckets, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family.add_metric([], buckets, sum_value=lags.sum_s)
    registry = CollectorRegistry()
    registry.register(_Fixed([family]))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):  # noqa: ANN201 — the prometheus_client collector protocol
        return self.families


def set_workflow_outbox(backlog: dict, stats: dict, reconciler_started: int, reconciler_quiet: int) -> None:
    WF_OUTBOX_BACKLOG.set(backlog["backlog"])
    WF_OUTBOX_OLDEST.set(backlog["oldest_age_seconds"])
    WF_OUTBOX_DELIVERED.set(stats["delivered_total"])
    WF_OUTBOX_FAILED.set(stats["failed_total"])
    WF_OUTBOX_RATE.set(stats["delivered_per_second"])
    WF_OUTBOX_DISPATCHERS.set(stats["dispatchers"])
    WF_OUTBOX_TEMPORAL_UP.set(0 if stats["temporal_ok"] is False else 1)
    WF_SIGNAL_LAG_P50.set(stats["lag_p50_ms"] or 0)
    WF_SIGNAL_LAG_P95.set(stats["lag_p95_ms"] or 0)
    RECONCILER_STARTED.set(reconciler_started)
    RECONCILER_QUIET.set(reconciler_quiet)


def route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def observe_request(request: Request, status: int, seconds: float) -> None:
    route = route_template(request)
    REQUESTS.labels(request.method, route, str(status)).inc()
    LATENCY.labels(request.method, route).observe(seconds)


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
