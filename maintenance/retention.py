"""Edge expiry and retention (reference §9): each batch its own short transaction."""

from __future__ import annotations

from settings import Settings
from storage import delegations, maintenance
from storage.db import Database


async def expire_and_clean(db: Database, settings: Settings) -> dict[str, int]:
    """Settle every lapsed edge, then delete one batch of each kind past its retention."""
    batch = settings.RETENTION_CLEANUP_BATCH_SIZE
    expired = 0
    while True:
        async with db.transaction() as conn:
            n = await delegations.expire_edges(conn, batch)
        expired += n
        if n < batch:
            break
    async with db.transaction() as conn:
        counts = await maintenance.retention(conn, settings)
    return {"expired_edges": expired, **counts}
