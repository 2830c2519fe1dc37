"""Pieces every workflow shares: how a refused command travels, retry policies, time parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow

from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

# A command's transaction answers an HTTP request: retry briefly, then give the client a 503.
COMMAND_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=1), maximum_attempts=4)
# Timers and fan-out must happen eventually, whatever the outage.
DURABLE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=500), backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=5))
# All attempts of a command's transaction together: shorter than the API's RPC timeout, so an
# outage answers 503 postgres_unavailable rather than temporal_unavailable.
COMMAND_TIMEOUT = timedelta(seconds=4)

POSTGRES_UNAVAILABLE = (503, {"error": "postgres_unavailable", "dependency": "postgres"})


def rejection(status: int, body: dict[str, Any]) -> ApplicationError:
    """A command refused: becomes the HTTP answer `status`/`body` (see api/temporal_gateway.py)."""
    return ApplicationError(body.get("error", "rejected"), status, body, type="CoordinatorError", non_retryable=True)


def parse_time(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


async def create_arrived(still_creating: Callable[[], bool]) -> bool:
    """Wait for the create update that comes with the start (update-with-start).

    False when none arrived within five minutes: the workflow then ends without an entity.
    """
    if not still_creating():
        return True
    try:
        await workflow.wait_condition(lambda: not still_creating(), timeout=timedelta(minutes=5),
                                      timeout_summary="awaiting create")
        return True
    except asyncio.TimeoutError:
        return False
