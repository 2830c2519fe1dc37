"""What Temporal itself costs per followed session, without the Coordinator: the floor of the
follow path's CPU on a given server.

    .venv/bin/python -m bench.temporal_floor [--address 127.0.0.1:7233] [--count 3000]

A workflow as small as a session's can be: started by signal-with-start, it takes the signal in
its first workflow task and sleeps on a one-hour timer (one start, one signal, one workflow task,
one timer: what a created session costs Temporal). Its worker runs in this process, unsandboxed.
Three ways of starting the same workflow are measured, `--count` each at `--concurrency`:
signal-with-start (what the dispatcher does), plain start, and eager start (the first workflow
task comes back in the start response to a worker of the same client, saving matching's round
trip). For each: the rate, and the CPU per workflow of the Temporal server (the process listening
on the address's port) and of this process (client and worker together). The workflows are
terminated afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import timedelta

import psutil
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from bench.procs import _listener


@workflow.defn(name="FloorSession")
class FloorSession:
    def __init__(self) -> None:
        self.notice: str | None = None

    @workflow.signal
    def created(self, notice: str) -> None:
        self.notice = notice

    @workflow.run
    async def run(self, notice: str | None) -> None:
        self.notice = self.notice or notice
        await workflow.wait_condition(lambda: self.notice is not None)
        await workflow.sleep(timedelta(hours=1))


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _until_idle(proc: psutil.Process, below: float = 0.05, window: float = 0.5) -> None:
    """Until `proc` uses less than `below` of a core over `window` seconds."""
    while True:
        c0 = _cpu(proc)
        await asyncio.sleep(window)
        if _cpu(proc) - c0 < below * window:
            return


async def _measure(client: Client, server: psutil.Process, queue: str, way: str, count: int,
                   concurrency: int) -> dict[str, float]:
    me = psutil.Process()
    ids = [f"floor/{way}/{uuid.uuid4().hex}" for _ in range(count)]

    async def one(wid: str) -> None:
        if way == "signal_with_start":
            await client.start_workflow(FloorSession.run, None, id=wid, task_queue=queue,
                                        start_signal="created", start_signal_args=["created"])
        else:
            await client.start_workflow(FloorSession.run, "created", id=wid, task_queue=queue,
                                        request_eager_start=(way == "eager_start"))

    async def lane(mine: list[str]) -> None:
        for wid in mine:
            await one(wid)

    await _until_idle(server)
    s0, m0, t0 = _cpu(server), _cpu(me), time.monotonic()
    await asyncio.gather(*(lane(ids[i::concurrency]) for i in range(concurrency)))
    # Then until the server is idle again: its workflow tasks, timers and visibility writes are done.
    await _until_idle(server)
    elapsed = time.monotonic() - t0 - 0.5  # the idle window
    s1, m1 = _cpu(server), _cpu(me)
    for wid in ids:
        await client.get_workflow_handle(wid).terminate("temporal_floor done")
    return {"per_s": round(count / elapsed, 1), "server_ms": round((s1 - s0) * 1000 / count, 2),
            "client_and_worker_ms": round((m1 - m0) * 1000 / count, 2)}


WAYS = ("signal_with_start", "start", "eager_start")


async def run(address: str, namespace: str, count: int, concurrency: int, ways: tuple[str, ...] = WAYS) -> None:
    port = address.rpartition(":")[2]
    server = _listener(int(port))
    if server is None:
        raise SystemExit(f"no process listens on {address}")
    client = await Client.connect(address, namespace=namespace)
    queue = f"floor-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[FloorSession],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        for way in ways:
            result = await _measure(client, server, queue, way, count, concurrency)
            print(f"{way}: {result}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:7233")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma list of " + ", ".join(WAYS))
    args = parser.parse_args()
    ways = tuple(w.strip() for w in args.ways.split(",") if w.strip())
    if set(ways) - set(WAYS):
        parser.error(f"--ways: unknown {sorted(set(ways) - set(WAYS))}")
    asyncio.run(run(args.address, args.namespace, args.count, args.concurrency, ways))


if __name__ == "__main__":
    main()
