"""The operational reads of /ready, /metrics and /stats."""

from __future__ import annotations

from typing import Any

from storage.db import Database, one

# The tables whose rows /metrics and /stats count by status, by the name they report them under.
STATUS_TABLES = {"sessions": "sessions", "invocations": "agent_invocations", "outbox": "caracal_outbox",
                 "delegations": "delegation_edges"}


async def ping(db: Database) -> None:
    await db.fetchval("SELECT 1")


async def count_by_status(db: Database, kind: str) -> dict[str, int]:
    """Rows of one of STATUS_TABLES by status, in status order."""
    rows = await db.fetch(f"SELECT status, count(*) AS n FROM {STATUS_TABLES[kind]} GROUP BY status ORDER BY status")
    return {r["status"]: r["n"] for r in rows}


async def idempotency_receipts(db: Database) -> dict[str, Any]:
    """The live receipts: how many, and the age (seconds) of the oldest."""
    row = one(await db.fetchrow("""SELECT count(*) AS rows,
                                          COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) AS oldest
                                   FROM coordinator_idempotency_receipts WHERE expires_at > now()"""))
    return {"rows": row["rows"], "oldestSeconds": int(row["oldest"])}
