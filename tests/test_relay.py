"""Outbox publisher to Redis Streams (reference §8 encoding, §9; §13 case 106), against a real
redis-server started here and a database of its own (the publisher takes every pending row)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis.asyncio as aioredis

from feed.relay import OutboxPublisher
from devstack.postgres import free_port
from settings import load_settings
from storage.db import Database
from storage.migrate import upgrade
from storage.event_feed import AGENTS_LIFECYCLE, INVOCATIONS_LIFECYCLE, Event, emit

STREAMS_KEY = "5e" * 32
REDIS_SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(REDIS_SERVER is None,
                                reason="redis-server is not installed (make test-deps installs it with apt-get)")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import redis

    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def relay_db(postgres):
    name = f"relay_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = postgres.url(name)
    await asyncio.to_thread(upgrade, url)
    db = Database(url, max_size=5)
    await db.open()
    yield db
    await db.close()


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


def _settings(db: Database, redis_url: str, **overrides):
    return load_settings(**{"DATABASE_URL": db.url, "REDIS_URL": redis_url, "STREAMS_HMAC_KEY": STREAMS_KEY,
                            "OUTBOX_INTERVAL_MS": 20, **overrides})


async def _emit(db: Database, events: list[Event], zone_id: str = "z1") -> None:
    async with db.transaction() as conn:
        await emit(conn, zone_id, events)


def _expected_sig(topic: str, fields: dict[str, str]) -> str:
    message = f"{topic}\n" + "".join(f"{k}={fields[k]}\n" for k in sorted(fields) if k != "_sig")
    return hmac.new(bytes.fromhex(STREAMS_KEY), message.encode(), hashlib.sha256).hexdigest()


async def test_message_encoding_and_signature(relay_db, redis, redis_url):
    # §13 case 106: {event:"created", count:1} → fields outbox_id, dedupe_key, event "created", count "1"
    payload = {"event": "created", "count": 1, "nested": {"b": [1, 2.0, None], "a": "x"}, "none": None,
               "flag": True, "outbox_id": "spoofed", "_sig": "spoofed"}
    await _emit(relay_db, [Event(INVOCATIONS_LIFECYCLE, "invocation.created:i1", payload)])
    row = await relay_db.fetchrow("SELECT id, payload_json FROM caracal_outbox")
    publisher = OutboxPublisher(relay_db, _settings(relay_db, redis_url))
    try:
        result = await publisher.publish_batch()
    finally:
        await publisher.aclose()
    assert (result.claimed, result.published, result.failed) == (1, 1, 0)

    [(entry_id, fields)] = await redis.xrange(INVOCATIONS_LIFECYCLE)
    names = list(fields)
    payload_order = [k for k in row["payload_json"] if k not in ("outbox_id", "_sig")]  # jsonb's key order
    assert names == ["outbox_id", "dedupe_key", *payload_order, "_sig"]
    assert fields["outbox_id"] == row["id"] and fields["dedupe_key"] == "invocation.created:i1"
    assert fields["event"] == "created" and fields["count"] == "1" and fields["flag"] == "true"
    assert fields["none"] == "null"
    assert fields["nested"] == '{"a":"x","b":[1,2,null]}'  # JSON text (jsonb key order), as JavaScript prints it
    assert fields["_sig"] == _expected_sig(INVOCATIONS_LIFECYCLE, {k: v for k, v in fields.items() if k != "_sig"})

    stored = await relay_db.fetchrow("SELECT status, attempts, published_at FROM caracal_outbox")
    assert stored["status"] == "published" and stored["attempts"] == 1 and stored["published_at"] is not None

    # without a key there is no _sig
    await _emit(relay_db, [Event(AGENTS_LIFECYCLE, "spawn:s1", {"event": "spawn"})])
    publisher = OutboxPublisher(relay_db, _settings(relay_db, redis_url, STREAMS_HMAC_KEY=""))
    try:
        await publisher.publish_batch()
    finally:
        await publisher.aclose()
    [(_, fields)] = await redis.xrange(AGENTS_LIFECYCLE)
    assert "_sig" not in fields and fields["event"] == "spawn"


async def test_streams_are_capped_approximately(relay_db, redis, redis_url):
    await _emit(relay_db, [Event(AGENTS_LIFECYCLE, f"spawn:{i}", {"event": "spawn"}) for i in range(400)])
    publisher = OutboxPublisher(relay_db, _settings(relay_db, redis_url, STREAMS_MAXLEN=10, OUTBOX_BATCH_SIZE=200))
    try:
        while (await publisher.publish_batch()).claimed:
            pass
    finally:
        await publisher.aclose()
    length = await redis.xlen(AGENTS_LIFECYCLE)
    assert 10 <= length < 400  # MAXLEN ~ trims whole nodes: near the cap, never below it


async def test_redis_failures_back_off_then_go_dead(relay_db, redis_url):
    # §13 case 106: failure at attempts 0 → attempts 1, available_at ≈ now+1–2 s; at attempts 9 (max 10) → dead
    await _emit(relay_db, [Event(AGENTS_LIFECYCLE, "spawn:a", {"event": "spawn"}),
                           Event(AGENTS_LIFECYCLE, "spawn:b", {"event": "spawn"})])
    await relay_db.execute("UPDATE caracal_outbox SET attempts = 9 WHERE dedupe_key = 'spawn:b'")
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    publisher = OutboxPublisher(relay_db, _settings(relay_db, closed, OUTBOX_MAX_ATTEMPTS=10))
    before = datetime.now(timezone.utc)
    try:
        result = await publisher.publish_batch()
    finally:
        await publisher.aclose()
    assert (result.claimed, result.published, result.failed, result.dead) == (2, 0, 2, 1)
    rows = {r["dedupe_key"]: r for r in await relay_db.fetch("SELECT * FROM caracal_outbox")}
    a, b = rows["spawn:a"], rows["spawn:b"]
    assert a["status"] == "pending" and a["attempts"] == 1
    delay = a["available_at"] - before
    assert timedelta(seconds=1) <= delay <= timedelta(seconds=2.5), delay
    assert b["status"] == "dead" and b["attempts"] == 10


async def test_delivers_every_event_once_and_marks_a_failing_one_dead(relay_db, redis, redis_url):
    good = [Event(topic, f"{topic}:{i}", {"event": "e", "i": i})
            for i in range(60) for topic in (AGENTS_LIFECYCLE, INVOCATIONS_LIFECYCLE)]
    await _emit(relay_db, good[:70], "z1")
    await _emit(relay_db, [Event("broken.topic", "bad:1", {"event": "bad"})], "z2")
    await _emit(relay_db, good[70:], "z3")
    await redis.set("broken.topic", "not a stream")  # XADD to it fails: WRONGTYPE
    settings = _settings(relay_db, redis_url, OUTBOX_BATCH_SIZE=25, OUTBOX_MAX_ATTEMPTS=3)
    publisher = OutboxPublisher(relay_db, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        async def state():
            rows = await relay_db.fetch("SELECT status, attempts, available_at FROM caracal_outbox "
                                        "WHERE topic = 'broken.topic'")
            # do not wait out the real backoff: make the failed row due again
            await relay_db.execute("UPDATE caracal_outbox SET available_at = now() WHERE topic = 'broken.topic' "
                                   "AND status = 'pending'")
            return rows[0]["status"] == "dead" and await relay_db.fetchval(
                "SELECT count(*) FROM caracal_outbox WHERE status = 'pending'") == 0

        deadline = time.monotonic() + 20
        while not await state():
            assert time.monotonic() < deadline, "publisher did not settle every row"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

    bad = await relay_db.fetchrow("SELECT status, attempts FROM caracal_outbox WHERE topic = 'broken.topic'")
    assert bad["status"] == "dead" and bad["attempts"] == 3
    published = await relay_db.fetch("SELECT id, topic, attempts FROM caracal_outbox WHERE status = 'published'")
    assert len(published) == len(good) and all(r["attempts"] == 1 for r in published)
    delivered = []
    for topic in (AGENTS_LIFECYCLE, INVOCATIONS_LIFECYCLE):
        delivered += [fields["outbox_id"] for _, fields in await redis.xrange(topic)]
    assert len(delivered) == len(set(delivered)) == len(good)
    assert set(delivered) == {r["id"] for r in published}
    # each stream holds its topic's events in outbox order
    seqs = {r["id"]: r["seq"] for r in await relay_db.fetch("SELECT id, seq FROM caracal_outbox")}
    for topic in (AGENTS_LIFECYCLE, INVOCATIONS_LIFECYCLE):
        order = [seqs[fields["outbox_id"]] for _, fields in await redis.xrange(topic)]
        assert order == sorted(order)


async def test_two_publishers_share_the_work_without_duplicates(relay_db, redis, redis_url):
    await _emit(relay_db, [Event(AGENTS_LIFECYCLE, f"spawn:{i}", {"event": "spawn"}) for i in range(300)])
    settings = _settings(relay_db, redis_url, OUTBOX_BATCH_SIZE=20)
    publishers = [OutboxPublisher(relay_db, settings) for _ in range(2)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in publishers]
    try:
        deadline = time.monotonic() + 20
        while await relay_db.fetchval("SELECT count(*) FROM caracal_outbox WHERE status = 'pending'"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = [fields["outbox_id"] for _, fields in await redis.xrange(AGENTS_LIFECYCLE)]
    assert len(ids) == len(set(ids)) == 300
