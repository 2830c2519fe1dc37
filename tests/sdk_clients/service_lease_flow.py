"""Drive a running Coordinator with the published client `caracalai-sdk==1.0.0` (Python >= 3.12).

    python service_lease_flow.py BASE_URL ZONE_ID APPLICATION_ID TOKEN

Runs the service-lease flow of sdk-wire-contract §4.5 over real HTTP:
start_session (service) -> heartbeat -> attach_session (takeover, generation + 1) -> the stale
holder's heartbeat is fenced (409 session_lease_fenced) -> the stale holder's aclose counts the
session as gone without ending it -> the new holder heartbeats and aclose()s it (DELETE with its
generation). Prints one JSON object with what it saw; the pytest side asserts on it and on the
database. Exits non-zero only on an unexpected exception.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
from caracalai import CoordinatorError
from caracalai.advanced import Caracal, CaracalConfig
from caracalai.coordinator import CoordinatorClient


async def session_status(base_url: str, zone_id: str, token: str, session_id: str) -> str:
    async with httpx.AsyncClient(timeout=10.0) as http:
        r = await http.get(f"{base_url}/zones/{zone_id}/agents/{session_id}",
                           headers={"authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json()["status"]


async def main(base_url: str, zone_id: str, application_id: str, token: str) -> dict:
    out: dict = {}
    caracal = Caracal(CaracalConfig(coordinator=CoordinatorClient(base_url=base_url), zone_id=zone_id,
                                    application_id=application_id, subject_token=token))
    try:
        # heartbeat_interval=0: no background loop, every beat below is explicit.
        first = await caracal.start_session(task="sdk-probe", labels=["sdk"], heartbeat_interval=0)
        out["session_id"] = first.session_id
        out["start"] = {"lease_generation": first.lease_generation,
                        "heartbeat_deadline_at": first.heartbeat_deadline_at, "status": first.status}

        await first.heartbeat()
        out["heartbeat"] = {"status": first.status, "heartbeat_deadline_at": first.heartbeat_deadline_at,
                            "lease_generation": first.lease_generation}

        second = await caracal.attach_session(first.session_id, heartbeat_interval=0)
        out["attach"] = {"lease_generation": second.lease_generation, "status": second.status,
                         "heartbeat_deadline_at": second.heartbeat_deadline_at}

        try:
            await first.heartbeat()
            out["stale_heartbeat"] = {"accepted": True}
        except CoordinatorError as exc:
            out["stale_heartbeat"] = {"status": exc.status, "code": exc.code}

        # The stale holder retires: its DELETE carries generation 1, is fenced (409
        # session_lease_fenced), which the SDK counts as "gone" -- the session must survive.
        await first.aclose()
        out["status_after_stale_close"] = await session_status(base_url, zone_id, token, first.session_id)

        await second.heartbeat()
        out["new_holder_heartbeat"] = {"status": second.status, "lease_generation": second.lease_generation}
        await second.aclose()
        out["status_after_close"] = await session_status(base_url, zone_id, token, first.session_id)
    finally:
        await caracal.aclose()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
