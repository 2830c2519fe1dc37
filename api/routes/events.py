"""`GET /zones/:z/events`: the zone's outbox events, in order, resumable (docs/DESIGN.md, our addition).

Same authentication as the other zone routes (the operator token is allowed). Two forms:

* long poll (default): `?after=<cursor>&topic=<t>&limit=<1..500>&wait=<0..30 s>` answers
  `{"items": [{"id","cursor","topic","dedupe_key","payload","created_at"}], "next_cursor": "<c>"}`;
  with no event after the cursor it waits up to `wait` seconds for one. Continue with
  `after=next_cursor`.
* server-sent events (`Accept: text/event-stream`): one `id:`/`event:`/`data:` message per event
  (id = the event's cursor, event = topic, data = the item's JSON), a comment line every
  15 s of silence; resume after a disconnect with `Last-Event-ID` (or `?after=`). A stream ends
  after SSE_MAX_SECONDS so that the bearer is checked again on reconnect.

Ordering and exactly-once delivery come from storage/event_feed.py. A waiting reader reads again
when its zone's events commit (feed/wakeups.py: pushed by Postgres NOTIFY), and every few seconds
regardless.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from api.deps import Caller, Services, ServicesDep
from api.routes.common import ZoneId, make_router
from rules.errors import CoordinatorError
from storage.event_feed import MAX_LIMIT, read_page

router = make_router("events")

MAX_WAIT_SECONDS = 30.0
KEEPALIVE_SECONDS = 15.0
SSE_MAX_SECONDS = 300.0


class EventsQuery(BaseModel):
    after: str | None = Field(default=None, pattern=r"^[0-9]{1,18}$", description="A cursor of this feed")
    topic: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[^\x00]+$")
    limit: int = Field(default=100, ge=1, le=MAX_LIMIT)
    wait: float = Field(default=0, ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for an event (long poll)")


def _start_cursor(request: Request, query: EventsQuery) -> int:
    if query.after is not None:
        return int(query.after)
    last = request.headers.get("last-event-id", "").strip()
    if not last:
        return 0
    if not last.isdigit() or len(last) > 18:
        raise CoordinatorError(400, "invalid_query", details={"issues": [
            {"path": ["Last-Event-ID"], "message": "must be a cursor of this feed"}]})
    return int(last)


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "").lower()


class EventPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str


@router.get("/zones/{zone_id}/events", summary="Outbox events of the zone (long poll or server-sent events)",
            response_model=EventPage,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "JSON page, or server-sent events with `Accept: text/event-stream`"}})
async def zone_events(zone_id: ZoneId, query: Annotated[EventsQuery, Query()], request: Request, ident: Caller,
                      svc: ServicesDep,
                      last_event_id: Annotated[str, Header(
                          alias="Last-Event-ID", pattern=r"^\s*[0-9]{0,18}\s*$",
                          description="Resume after this cursor (when `after` is not given)")] = "") -> Response:
    after = _start_cursor(request, query)
    if _wants_stream(request):
        return StreamingResponse(_stream(request, svc, zone_id, after, query), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    deadline = time.monotonic() + query.wait
    with svc.feed.watch(zone_id) as watch:
        while True:
            watch.arm()  # before the read: a commit during it wakes the wait below
            remaining = deadline - time.monotonic()
            items, after = await read_page(svc.db, zone_id, after=after, limit=query.limit, topic=query.topic,
                                           gate_timeout=min(max(remaining, 1.0), 5.0))
            remaining = deadline - time.monotonic()
            if items or remaining <= 0:
                break
            await watch.wait(remaining)
    return Response(json.dumps({"items": items, "next_cursor": str(after)}), media_type="application/json")


def _sse(item: dict[str, Any]) -> bytes:
    return f"id: {item['cursor']}\nevent: {item['topic']}\ndata: {json.dumps(item)}\n\n".encode()


async def _stream(request: Request, svc: Services, zone_id: str, after: int,
                  query: EventsQuery) -> AsyncIterator[bytes]:
    started = last_write = time.monotonic()
    with svc.feed.watch(zone_id) as watch:
        yield b"retry: 1000\n\n"
        while time.monotonic() - started < SSE_MAX_SECONDS:
            watch.arm()
            items, after = await read_page(svc.db, zone_id, after=after, limit=query.limit, topic=query.topic,
                                           gate_timeout=2.0)
            if items:
                yield b"".join(_sse(item) for item in items)
                last_write = time.monotonic()
                if len(items) == query.limit:
                    continue  # more may be waiting
            elif time.monotonic() - last_write >= KEEPALIVE_SECONDS:
                yield b": keepalive\n\n"
                last_write = time.monotonic()
            if await request.is_disconnected():
                return
            now = time.monotonic()
            await watch.wait(max(0.0, min(KEEPALIVE_SECONDS - (now - last_write), SSE_MAX_SECONDS - (now - started))))
