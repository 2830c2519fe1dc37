"""The glue of the long-running processes' entry points (`python worker.py`, `python -m notices`,
`python -m feed.relay`): logging from LOG_LEVEL, a stop event for SIGINT and SIGTERM, the run."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call it in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run(main: Callable[[], Coroutine[Any, Any, None]], *, hard_exit: bool = False) -> None:
    """Log at LOG_LEVEL (default INFO) and run `main`. With `hard_exit`, leave through os._exit(0)
    once it returns: a process holding a Temporal client can otherwise abort at interpreter exit
    (temporalio#300)."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format=LOG_FORMAT)
    asyncio.run(main())
    if hard_exit:
        os._exit(0)
