"""The status history of sessions and edges (migration 0011): who changed what, when, why; and the
SQL that reads an entity as it was at an instant (`at=` on the graph reads).

The triggers write the rows. The actor is the transaction's `coordinator.actor` setting, sent with
its BEGIN from `storage.db.ACTOR` (the API sets it for every request with an identity), and a
change names its reason with `change_reason_sql` inside its own statement: neither costs a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rules.errors import CoordinatorError
from rules.timefmt import iso_ms
from settings import Settings
from storage.db import Conn, one, q1

def change_reason_sql(param: str) -> str:
    """A boolean SQL expression (true) that names the reason of the status changes the statement
    makes: put it in the statement's WHERE as `AND <it>` (an uncorrelated subquery, run once,
    before the statement's rows change and its trigger reads the setting)."""
    return f"(SELECT set_config('coordinator.change_reason', {param}, true) IS NOT NULL)"


@dataclass(frozen=True)
class Window:
    earliest: datetime
    latest: datetime


async def window(conn: Conn, settings: Settings) -> Window:
    """The instants the history answers for: from the later of the retention horizon and the
    history's start, to now."""
    row = one(await q1(conn, """
        SELECT GREATEST((SELECT started_at FROM status_history_start),
                        now() - make_interval(days => %s)) AS earliest, now() AS latest""",
                       (settings.DELEGATION_RETENTION_DAYS,)))
    return Window(row["earliest"], row["latest"])


async def check_instant(conn: Conn, settings: Settings, at: datetime) -> None:
    """400 for an instant the history cannot answer for."""
    bounds = await window(conn, settings)
    if at > bounds.latest:
        raise CoordinatorError(400, "at_in_future", message="`at` is later than now",
                               latest=iso_ms(bounds.latest))
    if at < bounds.earliest:
        raise CoordinatorError(400, "at_outside_history",
                               message="`at` is before the status history's window (retention)",
                               earliest=iso_ms(bounds.earliest))


def last_status_sql(entity: str, id_expr: str, at_param: str, columns: str = "h.status") -> str:
    """A subquery: `columns` of the last status row (alias h) of entity `id_expr` at or before
    `at_param`; no row when the entity did not exist then."""
    assert entity in ("session", "edge")
    return f"""(SELECT {columns} FROM status_history h
                WHERE h.entity_id = {id_expr} AND h.entity = '{entity}' AND h.changed_at <= {at_param}
                ORDER BY h.changed_at DESC, h.seq DESC LIMIT 1)"""


def status_at_sql(entity: str, id_expr: str, at_param: str) -> str:
    """The status entity `id_expr` had at `at_param` (NULL: it did not exist then)."""
    return last_status_sql(entity, id_expr, at_param)


async def entity_history(conn: Conn, entity: str, entity_id: str, at: datetime) -> list[dict[str, Any]]:
    """The statuses one entity took up to `at`, oldest first."""
    cur = await conn.execute("""
        SELECT status, previous_status, changed_at, actor, reason FROM status_history
        WHERE entity_id = %s AND entity = %s AND changed_at <= %s ORDER BY changed_at, seq""",
                             (entity_id, entity, at))
    return await cur.fetchall()
