"""Fill a Temporal namespace with closed workflow histories, fast (for the follow benchmark).

    .venv/bin/python -m bench.temporal_seed --closed 100000 [--address 127.0.0.1:7233]

Each one is an `AgentSession` workflow with the search attributes a real one carries (zone,
application, session, status, lifecycle), started on a task queue no worker polls and then
terminated: two RPCs, no workflow task, so it costs the store a history and a visibility row
without the worker. (Running histories come from real sessions: create them through the API,
e.g. `python -m bench follow_curve` on a zone with MAX_AGENTS_PER_ZONE raised, or the burst in
scenario 11.) Prints the rate as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from rules import workflow_contract as wc


async def seed(address: str, namespace: str, closed: int, concurrency: int) -> None:
    client = await Client.connect(address, namespace=namespace)
    zone = f"seed-{uuid.uuid4().hex[:8]}"
    queue = f"seed-nobody-{zone}"
    done = 0
    t0 = time.monotonic()
    next_i = 0

    async def one(i: int) -> None:
        session_id = f"seed-{i:07d}-{uuid.uuid4().hex[:6]}"
        attrs = TypedSearchAttributes([
            SearchAttributePair(SearchAttributeKey.for_keyword(wc.SA_ZONE), zone),
            SearchAttributePair(SearchAttributeKey.for_keyword(wc.SA_APPLICATION), "seed-app"),
            SearchAttributePair(SearchAttributeKey.for_keyword(wc.SA_SESSION), session_id),
            SearchAttributePair(SearchAttributeKey.for_keyword(wc.SA_SESSION_STATUS), "terminated"),
            SearchAttributePair(SearchAttributeKey.for_keyword(wc.SA_LIFECYCLE), "task")])
        handle = await client.start_workflow(
            wc.SESSION_WORKFLOW, {"zone_id": zone, "session_id": session_id},
            id=wc.session_workflow_id(zone, session_id), task_queue=queue, search_attributes=attrs,
            static_summary=f"seeded session {session_id}")
        await handle.terminate("seeded closed history")

    async def worker() -> None:
        nonlocal done, next_i
        while next_i < closed:
            i, next_i = next_i, next_i + 1
            await one(i)
            done += 1
            if done % 5000 == 0:
                print(f"{done} closed histories, {done / (time.monotonic() - t0):.0f}/s", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(f"seeded {done} closed histories in zone {zone} in {time.monotonic() - t0:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:7233")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--closed", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(seed(args.address, args.namespace, args.closed, args.concurrency))


if __name__ == "__main__":
    main()
