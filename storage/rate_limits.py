"""Rate-limit windows shared by every API process (migration 0004): a process reserves a slice of
a key's window and admits requests from it locally (api/ratelimit.py)."""

from __future__ import annotations

from storage.db import Database

_RESERVE = """
INSERT INTO rate_limit_windows AS w (limiter, key, window_start, used)
VALUES (%(limiter)s, %(key)s, %(window)s, %(want)s)
ON CONFLICT (limiter, key, window_start) DO UPDATE SET used = w.used + EXCLUDED.used
RETURNING used
"""


async def reserve(db: Database, limiter: str, key: str, window: int, want: int, limit: int) -> int:
    """Take up to `want` of the `limit` requests of (limiter, key) in `window`; return how many were
    granted (0 once the window is used up). One statement: concurrent reservations never grant more
    than `limit` in total."""
    key = key.replace("\x00", "\\0")[:256]  # a forwarded address is client text: NUL is not storable
    used = int(await db.fetchval(_RESERVE, {"limiter": limiter, "key": key, "window": window, "want": want}))
    return max(0, min(want, limit - (used - want)))


async def forget_windows_before(db: Database, window: int) -> int:
    return await db.execute("DELETE FROM rate_limit_windows WHERE window_start < %s", (window,))
