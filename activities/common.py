"""What every state-changing activity shares: apply an operation at most once."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

from storage.db import Conn, q1

T = TypeVar("T")


async def run_once(conn: Conn, op_id: str, fn: Callable[[], Awaitable[T]], decode: Callable[[dict[str, Any]], T]) -> T:
    """Apply `fn` at most once per op id, inside the caller's transaction.

    Activities are at-least-once: a retry after a lost completion finds the stored result of the
    committed attempt and returns it instead of applying the transition again.
    """
    if op_id:
        done = await q1(conn, "SELECT result_json FROM operation_results WHERE op_id = %s", (op_id,))
        if done is not None:
            return decode(done["result_json"])
    result = await fn()
    if op_id:
        await conn.execute("INSERT INTO operation_results (op_id, result_json) VALUES (%s, %s)",
                           (op_id, Jsonb(dataclasses.asdict(result))))
    return result
