"""Pieces every workflow shares: the retry policy of durable work, time parsing, the deadline timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

# Timers and maintenance must happen eventually, whatever the outage.
DURABLE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=500), backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=5))


def parse_time(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


async def wait_until(deadline: datetime | None, woken: Callable[[], bool], summary: str) -> bool:
    """Sleep until `deadline` (a durable timer named `summary` in the history) or until `woken()`.

    True when the deadline passed (at once if it already has), False when woken first. Without a
    deadline, waits for `woken()` only. The caller recomputes its deadline after every wake: a
    notice that moves the deadline simply re-arms the timer (temporalio samples: updatable_timer).
    """
    if deadline is None:
        await workflow.wait_condition(woken)
        return False
    remaining = (deadline - workflow.now()).total_seconds()
    if remaining <= 0:
        return True
    try:
        await workflow.wait_condition(woken, timeout=timedelta(seconds=remaining), timeout_summary=summary)
    except asyncio.TimeoutError:
        return True
    return False
