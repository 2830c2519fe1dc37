"""Cursor pagination shared by every list endpoint (reference §2): `ORDER BY id DESC`, `id < cursor`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Callable

from typing_extensions import TypedDict  # pydantic (the list routes' response model) needs it before 3.12

from rules.errors import CoordinatorError
from storage.db import Database, one

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
    sql, params = await _after_cursor(db, table, zone_id, cursor, sql, params)
    rows = await db.fetch(sql + " ORDER BY x.id DESC LIMIT %s", [*params, limit])
    items = [project(r) for r in rows]
    return {"items": items, "next_cursor": rows[-1]["id"] if len(rows) == limit and rows else None}


async def json_page(db: Database, *, table: str, zone_id: str, limit: int, cursor: str | None, body: str,
                    id_key: str, sql_from: str, params: list[Any]) -> bytes:
    """`list_page` with the items rendered by Postgres: `body` is a select list over alias `x` (see
    `body_columns`) whose key `id_key` is `x.id`, and `sql_from` a FROM ... WHERE clause. Returns the
    page as JSON bytes, ready to send."""
    sql_from, params = await _after_cursor(db, table, zone_id, cursor, sql_from, params)
    # string_agg, not json_agg: json_agg puts a newline between the items.
    page = one(await db.fetchrow(
        f"SELECT string_agg(row_to_json(b)::text, ',' ORDER BY b.{id_key} DESC) AS items, count(*) AS n, "
        f"min(b.{id_key}) AS last_id FROM (SELECT {body} {sql_from} ORDER BY x.id DESC LIMIT %s) b",
        [*params, limit]))
    next_cursor = json.dumps(page["last_id"]) if page["n"] == limit and limit else "null"
    return f'{{"items":[{page["items"] or ""}],"next_cursor":{next_cursor}}}'.encode()


async def _after_cursor(db: Database, table: str, zone_id: str, cursor: str | None, sql: str,
                        params: list[Any]) -> tuple[str, list[Any]]:
    """The page's WHERE clause restricted to ids after `cursor`, which must be an existing row id of
    `table` in the same zone, else 400 invalid_cursor."""
    assert table in _CURSOR_TABLES
    if cursor is None:
        return sql, params
    known = await db.fetchval(f"SELECT 1 FROM {table} WHERE zone_id = %s AND id = %s", (zone_id, cursor))
    if not known:
        raise CoordinatorError(400, "invalid_cursor")
    return sql + " AND x.id < %s", [*params, cursor]


def iso_ms_sql(column: str) -> str:
    """`rules.timefmt.iso_ms` in SQL: UTC, milliseconds truncated, `Z`; NULL stays NULL."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


def body_columns(fields: Iterable[tuple[str, str]]) -> str:
    """A select list from (JSON key, SQL expression) pairs: `row_to_json` of it renders the keys in
    this order."""
    return ", ".join(f'{expr} AS "{key}"' for key, expr in fields)
