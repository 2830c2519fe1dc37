"""Outbox publisher: coordinator outbox rows → Redis Streams (reference §8 encoding, §9).

Where it runs: when `REDIS_URL` is set, `worker.py` starts `OutboxPublisher.run` as an asyncio
task next to the Temporal worker and stops it on shutdown. It can also run alone:
`python -m feed.relay` (settings from the environment). Any number of copies may run:
each batch is claimed with row locks that skip rows another relay holds, so replicas share the work.

Every OUTBOX_INTERVAL_MS (at once again after a full batch) one transaction takes up to
OUTBOX_BATCH_SIZE pending coordinator rows whose `available_at` has come, in seq order, sends
one `XADD <topic> MAXLEN ~ STREAMS_MAXLEN * field value …` each (one pipelined round trip), and
settles every row from its own reply: published (attempts + 1, published_at), or failed:
attempts + 1 and `available_at = now + min(previous attempts + 1, 60) s + 0–1 s`, or `dead` once
attempts reach OUTBOX_MAX_ATTEMPTS.

Message fields, in order: `outbox_id`, `dedupe_key`, then the payload's keys (jsonb order) except
the reserved names outbox_id, dedupe_key and _sig; strings raw, anything else as compact JSON
(null → "null"). With STREAMS_HMAC_KEY (hex), `_sig` is appended: hex HMAC-SHA256 under the key's
bytes of "<topic>\\n" followed by "<k>=<v>\\n" for every other field, keys sorted.

Delivery is at least once: if the database commit fails after an XADD succeeded, the row is
sent again later; consumers deduplicate on `outbox_id`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from settings import Settings
from storage import event_feed

log = logging.getLogger("coordinator.relay")

RESERVED = frozenset({"outbox_id", "dedupe_key", "_sig"})
MAX_BACKOFF_SECONDS = 60


def _json_value(value: Any) -> Any:
    """JSON numbers as JavaScript prints them: an integral float is an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def encode_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(_json_value(value), separators=(",", ":"), ensure_ascii=False)


def encode_fields(outbox_id: str, dedupe_key: str, payload: dict[str, Any] | None) -> dict[str, str]:
    fields = {"outbox_id": outbox_id, "dedupe_key": dedupe_key}
    for key, value in (payload or {}).items():
        if key not in RESERVED:
            fields[key] = encode_value(value)
    return fields


def signature(key: bytes, topic: str, fields: dict[str, str]) -> str:
    message = f"{topic}\n" + "".join(f"{k}={fields[k]}\n" for k in sorted(fields) if k != "_sig"
                                     and fields[k] is not None)
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def message_for(row: dict[str, Any], key: bytes | None) -> dict[str, str]:
    fields = encode_fields(row["id"], row["dedupe_key"], row["payload_json"])
    if key:
        fields["_sig"] = signature(key, row["topic"], fields)
    return fields


def retry_delay(previous_attempts: int) -> float:
    return min(previous_attempts + 1, MAX_BACKOFF_SECONDS) + random.random()


@dataclass
class BatchResult:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0


class OutboxPublisher:
    def __init__(self, db: Any, settings: Settings, redis: Any = None) -> None:
        self.db = db
        self.settings = settings
        self._redis = redis
        self._owns_redis = redis is None
        self.key = bytes.fromhex(settings.STREAMS_HMAC_KEY) if settings.STREAMS_HMAC_KEY else None

    @property
    def redis(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        return self._redis

    async def aclose(self) -> None:
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _xadd_all(self, rows: list[dict[str, Any]]) -> list[Any]:
        """One reply per row: the stream entry id, or the exception that row failed with."""
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(row["topic"], message_for(row, self.key), maxlen=self.settings.STREAMS_MAXLEN, approximate=True)
        try:
            return await pipe.execute(raise_on_error=False)
        except Exception as exc:  # connection level: every row of the batch failed
            return [exc] * len(rows)

    async def publish_batch(self) -> BatchResult:
        result = BatchResult()
        async with self.db.transaction() as conn:
            rows = await event_feed.claim_for_relay(conn, self.settings.OUTBOX_BATCH_SIZE)
            result.claimed = len(rows)
            if not rows:
                return result
            replies = await self._xadd_all(rows)
            outcomes = list(zip(rows, replies, strict=True))
            ok = [row["id"] for row, reply in outcomes if not isinstance(reply, BaseException)]
            failed = [(row, reply) for row, reply in outcomes if isinstance(reply, BaseException)]
            if ok:
                await event_feed.mark_published(conn, ok)
            if failed:
                for row, reply in failed:
                    log.warning("outbox %s (%s) not published (attempt %d): %r", row["id"], row["topic"],
                                row["attempts"] + 1, reply)
                statuses = await event_feed.mark_failed(
                    conn, self.settings.OUTBOX_MAX_ATTEMPTS, [row["id"] for row, _ in failed],
                    [retry_delay(row["attempts"]) for row, _ in failed])
                result.dead = statuses.count("dead")
            result.published, result.failed = len(ok), len(failed)
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set; a failing tick is logged and retried at the next one."""
        interval = self.settings.OUTBOX_INTERVAL_MS / 1000
        log.info("outbox publisher started (batch %d, every %.3f s)", self.settings.OUTBOX_BATCH_SIZE, interval)
        try:
            while not stop.is_set():
                full = False
                try:
                    batch = await self.publish_batch()
                    full = batch.claimed >= self.settings.OUTBOX_BATCH_SIZE
                except Exception as exc:
                    log.warning("outbox publisher tick failed: %r", exc)
                if full:
                    continue
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except TimeoutError:
                    pass
        finally:
            await self.aclose()
            log.info("outbox publisher stopped")


async def main() -> None:
    import entrypoint
    from settings import get_settings

    settings = get_settings()
    if not settings.REDIS_URL:
        raise SystemExit("relay: REDIS_URL is not set")
    from storage.db import Database
    from storage.migrate import require_migrated

    require_migrated(settings.DATABASE_URL, "relay")
    db = Database(settings.DATABASE_URL, max_size=2, statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS)
    await db.open()
    stop = entrypoint.stop_event()
    try:
        await OutboxPublisher(db, settings).run(stop)
    finally:
        await db.close()


if __name__ == "__main__":
    import entrypoint

    entrypoint.run(main)
