"""Wake-ups for the API's waiting feed readers (`GET /zones/:z/events`, long poll and SSE).

One LISTEN connection per API process (storage.event_feed.feed_listener) hears each commit that
wrote events of a zone, and wakes the readers waiting on that zone, which then read the feed again.
A notification only says "read again": order and exactly-once delivery come from the reader's
cursor (storage/event_feed.py), so a lost or doubled wake-up costs latency, never an event. That
is why readers still re-read now and then (SAFETY_SECONDS), and every POLL_SECONDS while the
listener is not connected (it reconnects with backoff; every reader is woken when it is back).

Only zones somebody waits on have an entry, dropped with their last waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from storage.db import Database
from storage.event_feed import feed_listener

log = logging.getLogger("coordinator.feed")

# A waiting reader reads again after this long even without a notification.
SAFETY_SECONDS = 2.0
# ... and this often while the listener is not connected.
POLL_SECONDS = 0.2


class _Zone:
    """The waiters of one zone share one event, replaced by every wake-up: a waiter keeps the one it
    took before its read, so a wake-up during the read is not missed."""

    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0

    def wake(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class Watch:
    """A reader's registration on a zone: `arm()` before each read, then `wait(limit)`."""

    def __init__(self, wakeups: ZoneWakeups, zone: _Zone) -> None:
        self._wakeups, self._zone = wakeups, zone
        self._armed = zone.event

    def arm(self) -> None:
        self._armed = self._zone.event

    async def wait(self, limit: float) -> bool:
        """Until the zone is woken after the last `arm()`, at most `limit` seconds (and at most the
        re-read interval). Whether it was woken."""
        timeout = min(limit, SAFETY_SECONDS if self._wakeups.listening else POLL_SECONDS)
        if self._armed.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._armed.wait()
        return self._armed.is_set()


class ZoneWakeups:
    """The process's feed listener on `db`'s server and its waiting readers, per zone. A database
    without a URL (a test double): no listener, the readers poll."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._zones: dict[str, _Zone] = {}
        self._task: asyncio.Task[None] | None = None
        self._listening = False
        self._warned = False

    @property
    def listening(self) -> bool:
        return self._listening

    def start(self) -> None:
        """Start the listener (once; in the running loop). `watch` starts it too if needed."""
        url = getattr(self.db, "url", None) if self._task is None else None
        if url:
            listener = feed_listener(url, on_zone=self._notified, on_connect=self._connected, on_lost=self._lost)
            self._task = asyncio.get_running_loop().create_task(listener.run(), name="feed-listener")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listening = False

    @contextlib.contextmanager
    def watch(self, zone_id: str) -> Iterator[Watch]:
        self.start()
        zone = self._zones.get(zone_id)
        if zone is None:
            zone = self._zones[zone_id] = _Zone()
        zone.waiters += 1
        try:
            yield Watch(self, zone)
        finally:
            zone.waiters -= 1
            if zone.waiters == 0 and self._zones.get(zone_id) is zone:
                del self._zones[zone_id]

    def waiters(self, zone_id: str) -> int:
        zone = self._zones.get(zone_id)
        return zone.waiters if zone is not None else 0

    def _notified(self, zone_id: str) -> None:
        zone = self._zones.get(zone_id)
        if zone is not None:
            zone.wake()

    def _wake_all(self) -> None:
        for zone in self._zones.values():
            zone.wake()

    def _connected(self) -> None:
        self._listening = True
        if self._warned:
            log.info("feed listener connected again")
        self._warned = False
        self._wake_all()  # what was committed while nobody listened

    def _lost(self, exc: Exception) -> None:
        was = self._listening
        self._listening = False
        self._wake_all()  # the readers switch to polling until the listener is back
        if was and not self._warned:
            self._warned = True
            log.warning("feed listener lost (%s: %s): feed readers poll until it is back", type(exc).__name__, exc)
