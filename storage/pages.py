"""Cursor pagination shared by every list endpoint (reference §2): `ORDER BY id DESC`, `id < cursor`."""

from __future__ import annotations

from typing import Any, Callable

from typing_extensions import TypedDict  # pydantic (the list routes' response model) needs it before 3.12

from rules.errors import CoordinatorError
from storage.db import Database

class Page(TypedDict):
    """One page of a list: the items, newest first, and the cursor of the next page (None at the end)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


_CURSOR_TABLES = {"sessions", "delegation_edges", "agent_services", "agent_invocations"}


async def list_page(db: Database, *, table: str, zone_id: str, limit: int, cursor: str | None, sql: str,
                    params: list[Any], project: Callable[[dict[str, Any]], dict[str, Any]]) -> Page:
    """Run `sql` (which must end in a WHERE clause over alias `x`) as one page of `table`.

    The cursor must be an existing row id of that table in the same zone, else 400 invalid_cursor.
    """
    assert table in _CURSOR_TABLES
    if cursor is not None:
        known = await db.fetchval(f"SELECT 1 FROM {table} WHERE zone_id = %s AND id = %s", (zone_id, cursor))
        if not known:
            raise CoordinatorError(400, "invalid_cursor")
        sql += " AND x.id < %s"
        params = [*params, cursor]
    rows = await db.fetch(sql + " ORDER BY x.id DESC LIMIT %s", [*params, limit])
    items = [project(r) for r in rows]
    return {"items": items, "next_cursor": rows[-1]["id"] if len(rows) == limit and rows else None}
