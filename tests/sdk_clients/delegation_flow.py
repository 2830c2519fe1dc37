"""A whole delegation flow driven by the published client (caracalai-sdk 1.0.0) over real HTTP.

    python delegation_flow.py BASE_URL ZONE_ID APPLICATION_ID PEER_APPLICATION_ID   (token in $SDK_TOKEN)

Run by tests/test_delegations_api.py with the SDK's own venv (Python >= 3.12). Flow:
a peer session (its own root, on another task so it has no parent) -> root session -> child
(inherit) -> narrowed child (Authority.narrow) -> delegate from the narrowed child to the peer
(inside caracal.bind(narrowed): delegate() issues from the bound context) -> the peer accepts it
with validate=True -> revoke -> validate again (must fail) -> every block ends its session.
Prints one JSON summary line; any unexpected failure raises (non-zero exit with a traceback).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from caracalai import Authority, Caracal, DelegationConstraints
from caracalai.client import CaracalConfig
from caracalai.coordinator import CoordinatorClient, get_inbound_delegation


async def main(base_url: str, zone_id: str, app_id: str, peer_app_id: str, token: str) -> dict:
    calls: list[dict] = []

    def record(event) -> None:
        if event.type == "coordinator.call":
            calls.append({"method": event.method, "path": event.path, "status": event.status, "code": event.code})

    def client(application_id: str) -> Caracal:
        c = Caracal(CaracalConfig(coordinator=CoordinatorClient(base_url=base_url), zone_id=zone_id,
                                  application_id=application_id, subject_token=token))
        c.on_event(record)
        return c

    caracal, peer = client(app_id), client(peer_app_id)
    summary: dict = {}
    peer_ready: asyncio.Future = asyncio.get_running_loop().create_future()
    peer_done = asyncio.Event()

    async def peer_session() -> None:
        # A task runs in a copy of the creator's context: nothing is bound yet, so no parent.
        async with peer.session(ttl_seconds=600, task="peer") as ctx:
            peer_ready.set_result(ctx)
            await peer_done.wait()

    peer_task = asyncio.create_task(peer_session())
    try:
        peer_ctx = await asyncio.wait_for(asyncio.shield(peer_ready), timeout=30)
        summary["peer"] = peer_ctx.session_id
        async with caracal.session(ttl_seconds=600, task="root") as root:
            summary["root"] = root.session_id
            async with caracal.session(ttl_seconds=600, task="child") as child:
                summary["child"] = child.session_id
                summary["child_delegation_id"] = child.delegation_id
                narrow = Authority.narrow(["read"], ttl_seconds=300, resource_id="urn:a",
                                          constraints=DelegationConstraints(max_hops=2))
                async with caracal.session(authority=narrow, ttl_seconds=600, task="narrowed") as narrowed:
                    summary["narrowed"] = narrowed.session_id
                    summary["narrowed_delegation_id"] = narrowed.delegation_id
                    summary["narrowed_hop"] = narrowed.hop
                    summary["narrow_delegation_id"] = narrowed.delegation_id

                    async with caracal.bind(narrowed):
                        delegation = await caracal.delegate(to_session_id=peer_ctx.session_id,
                                                            to_application_id=peer_app_id, scopes=["read"],
                                                            ttl_seconds=120, resource_id="urn:a")
                    summary["peer_delegation_id"] = delegation.delegation_id
                    summary["peer_delegation_scopes"] = list(delegation.scopes)
                    summary["peer_delegation_expires_at"] = delegation.expires_at

                    async with caracal.bind(peer_ctx):
                        async with peer.accept_delegation(delegation.delegation_id, validate=True) as accepted:
                            summary["accepted_delegation_id"] = accepted.delegation_id
                            summary["accepted_hop"] = accepted.hop
                    inbound = await get_inbound_delegation(peer.config.coordinator, token, zone_id,
                                                           peer_ctx.session_id, delegation.delegation_id)
                    summary["inbound_status_before_revoke"] = inbound.status

                    await caracal.revoke_delegation(delegation.delegation_id)

                    summary["accept_after_revoke"] = None
                    try:
                        async with caracal.bind(peer_ctx):
                            async with peer.accept_delegation(delegation.delegation_id, validate=True):
                                pass
                    except RuntimeError as exc:
                        summary["accept_after_revoke"] = type(exc).__name__
    finally:
        peer_done.set()
        await peer_task
        await caracal.aclose()
        await peer.aclose()
    summary["calls"] = calls
    summary["errors"] = [c for c in calls if c["status"] >= 400 and not (
        # expected: the inbound check after the revoke, and ending the peer the revoke already ended
        (c["method"] == "GET" and "/delegations/inbound/" in c["path"])
        or (c["method"] == "DELETE" and c["path"].endswith("/" + summary.get("peer", "?"))))]
    return summary


if __name__ == "__main__":
    base, zone, app, peer_app = sys.argv[1:5]
    result = asyncio.run(main(base, zone, app, peer_app, os.environ["SDK_TOKEN"]))
    print(json.dumps(result))
