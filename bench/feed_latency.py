"""Scenario 13, `feed_latency`: how soon a command's event reaches a subscriber of the zone feed.

One server-sent-events stream on `GET /zones/:z/events` (topic `caracal.agents.lifecycle`), then
`feed_latency_commands` suspends and resumes of one session, one at a time. For each: the time
from the command's HTTP answer to its event's arrival on the stream (matched by event kind and
session id, in order), and from the request to the arrival. An event may arrive before the
answer does (the commit precedes both): that delay is then negative.

    python -m bench --scenarios feed_latency [--feed-latency-commands 500]
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench.core import Row, SetupError, Target, create_sessions, describe, percentile, value_row

TOPIC = "caracal.agents.lifecycle"
EVENT_TIMEOUT_S = 10.0


async def _read_stream(lines: Any, arrivals: asyncio.Queue[tuple[float, dict[str, Any]]],
                       connected: asyncio.Event) -> None:
    """Put (arrival time, payload) of every event of the stream, in order."""
    data: str | None = None
    async for line in lines:
        if line.startswith("retry:"):
            connected.set()  # the stream's first line: the server is reading the feed
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and data is not None:
            arrived = time.perf_counter()
            await arrivals.put((arrived, json.loads(data)["payload"]))
            data = None


async def feed_latency(ctx: Any) -> list[Row]:
    total = ctx.p("feed_latency_commands")
    zone = await ctx.zones.new("feed")
    [created] = await create_sessions(ctx.cfg, ctx.http, [(zone, zone.apps[0])])
    sid = created["agent_session_id"]
    headers = zone.headers()
    url = f"/zones/{zone.id}/events"
    first = await ctx.http.get(url, params={"topic": TOPIC, "limit": 500}, headers=headers)
    if first.status_code != 200:
        raise SetupError(f"GET {url} answered {first.status_code}", {describe(first): 1})
    cursor = first.json()["next_cursor"]

    arrivals: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
    connected = asyncio.Event()
    from_answer: list[float] = []
    from_request: list[float] = []
    errors = 0
    timeout = httpx.Timeout(EVENT_TIMEOUT_S, read=None)
    async with httpx.AsyncClient(base_url=ctx.cfg.base_url, timeout=timeout) as sse, ctx.client(1) as http:
        async with sse.stream("GET", url, params={"after": cursor, "topic": TOPIC},
                              headers={**headers, "Accept": "text/event-stream"}) as stream:
            if stream.status_code != 200:
                raise SetupError(f"SSE {url} answered {stream.status_code}", {f"{stream.status_code}": 1})
            reader = asyncio.create_task(_read_stream(stream.aiter_lines(), arrivals, connected))
            try:
                await asyncio.wait_for(connected.wait(), EVENT_TIMEOUT_S)
                await http.get(zone.agents(sid), headers=headers)  # warm the command connection up
                for i in range(total):
                    action = "suspend" if i % 2 == 0 else "resume"
                    sent = time.perf_counter()
                    resp = await http.patch(f"{zone.agents(sid)}/{action}", headers=headers)
                    answered = time.perf_counter()
                    if resp.status_code != 200:
                        raise SetupError(f"PATCH …/{action} answered {resp.status_code}", {describe(resp): 1})
                    while True:  # the next event of the probed session and kind is the command's
                        arrived, payload = await asyncio.wait_for(arrivals.get(), EVENT_TIMEOUT_S)
                        if payload.get("agent_session_id") == sid and payload.get("event") == action:
                            break
                    from_answer.append((arrived - answered) * 1000)
                    from_request.append((arrived - sent) * 1000)
            except asyncio.TimeoutError:
                errors += 1
            finally:
                reader.cancel()
    early = sum(1 for v in from_answer if v < 0)
    notes = f"{len(from_answer)} events; {early} arrived before their command's answer"
    return [
        _row("feed_latency", "command answer → event on the SSE stream", from_answer, errors,
             [Target("p50", 20, "p50 ≤ 20 ms")], notes),
        _row("feed_latency", "command request → event on the SSE stream", from_request, errors, [], ""),
    ]


def _row(scenario: str, name: str, values: list[float], errors: int, targets: list[Target], notes: str) -> Row:
    row = value_row(scenario, name, percentile(values, 50), targets, concurrency=1, requests=len(values),
                    errors=errors, notes=notes, max_ms=round(max(values), 3) if values else None,
                    min_ms=round(min(values), 3) if values else None)
    row.p95, row.p99 = percentile(values, 95), percentile(values, 99)
    return row.judge()
