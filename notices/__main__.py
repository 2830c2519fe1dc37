"""Run one dispatcher: `python -m notices` (settings from the environment, see settings.py).

It starts without Temporal (the client connects lazily: rows wait until Temporal answers) and
without Postgres (the pool connects in the background). SIGTERM or SIGINT: the batch in flight
finishes (bounded by twice DISPATCH_RPC_TIMEOUT_SECONDS), then it exits 0.
"""

from __future__ import annotations

import logging

import entrypoint
from settings import get_settings

log = logging.getLogger("coordinator.dispatcher")


async def main() -> None:
    from temporalio.client import Client

    from notices.dispatcher import Dispatcher
    from storage.db import Database
    from storage.migrate import require_migrated

    settings = get_settings()
    require_migrated(settings.DATABASE_URL, "dispatcher")
    # One connection for the batch transaction, one for the statistics (LISTEN has its own).
    db = Database(settings.DATABASE_URL, max_size=4, statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS,
                  connect_timeout_s=min(2.0, settings.DB_CONNECTION_TIMEOUT_MS / 1000))
    await db.open(wait=False)
    client = await Client.connect(settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE, lazy=True)
    stop = entrypoint.stop_event()
    try:
        await Dispatcher(db, client, settings).run(stop)
    finally:
        await db.close()


if __name__ == "__main__":
    entrypoint.run(main, hard_exit=True)
