"""Authority as of an instant (`at=`) and `explain=true`, through the HTTP API.

A scenario runs through time (chains created, a session suspended and resumed, an edge lapsing and
its expiry settled, a chain revoked, a source terminated); after every step the live answers are
recorded with the database's clock. Then every recorded instant is asked again with `at=`: the
answers must equal what the live routes said then. Explain must name the granting chain and the
reason each other edge adds nothing; instants outside the history's window answer 400.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

from storage import delegations as store
from tests.conftest import Zone
from tests.test_delegations_api import edge, iso, new_session


async def db_now(zone: Zone) -> datetime:
    return await zone.stack.db.fetchval("SELECT now()")


async def get(zone: Zone, path: str, **params: Any) -> Any:
    r = await zone.http.get(f"/zones/{zone.id}/{path}", params=params, headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    return r.json()


def edge_view(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    # What an edge looked like then: its version and updated fields are today's.
    return [(e["id"], e["status"], e["revoked_at"], e["expires_at"], tuple(e["scopes"])) for e in items]


async def snapshot(zone: Zone, sessions: list[str], at: str | None = None) -> dict[str, Any]:
    extra = {"at": at} if at else {}
    answer: dict[str, Any] = {"active": edge_view((await get(zone, "delegations/active", **extra))["items"])}
    for sid in sessions:
        answer[f"authority:{sid}"] = await get(zone, f"agents/{sid}/effective-authority", **extra)
        answer[f"inbound:{sid}"] = edge_view((await get(zone, f"delegations/inbound/{sid}", **extra))["items"])
        answer[f"outbound:{sid}"] = edge_view((await get(zone, f"delegations/outbound/{sid}", **extra))["items"])
        answer[f"status:{sid}"] = (await get(zone, f"agents/{sid}", **extra))["status"]
    return answer


async def test_authority_as_of_every_recorded_instant_equals_the_live_answer_then(zone: Zone) -> None:
    s0, s1, s2, s3, s4, s5 = [await new_session(zone) for _ in range(6)]
    sessions = [s0, s1, s2, s3, s4, s5]
    recorded: list[tuple[datetime, dict[str, Any]]] = []

    async def record() -> None:
        live = await snapshot(zone, sessions)
        recorded.append((await db_now(zone), live))

    await record()
    e1 = (await edge(zone, s0, s1, scopes=["read", "write"], constraints={"max_hops": 3}))["delegation_edge_id"]
    await record()
    e2 = (await edge(zone, s1, s2, scopes=["read"], parent_edge_id=e1, ttl_seconds=300,
                     constraints={"max_hops": 2}))["delegation_edge_id"]
    await record()
    e3 = (await edge(zone, s0, s3, ttl_seconds=1))["delegation_edge_id"]
    await record()
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{s2}/suspend", headers=zone.headers())).status_code == 200
    await record()
    assert (await zone.http.patch(f"/zones/{zone.id}/agents/{s2}/resume", headers=zone.headers())).status_code == 200
    await record()
    await asyncio.sleep(1.2)  # e3 lapses: the live routes stop counting it before its expiry is settled
    await record()
    async with zone.stack.db.transaction() as conn:
        await store.expire_edges(conn, 1000)  # unless the maintenance schedule got there first
    assert (await zone.stack.db.fetchval("SELECT status FROM delegation_edges WHERE id = %s", (e3,))) == "expired"
    await record()
    e4 = (await edge(zone, s4, s5))["delegation_edge_id"]
    await record()
    r = await zone.http.patch(f"/zones/{zone.id}/delegations/{e1}/revoke", headers=zone.headers())
    assert r.status_code == 200, r.text
    await record()
    assert (await zone.http.delete(f"/zones/{zone.id}/agents/{s4}", headers=zone.headers())).status_code == 204
    await record()

    # Something changed at each step: the comparison below is not between equal answers.
    assert len({repr(answer) for _, answer in recorded}) >= 8
    for instant, live in recorded:
        assert await snapshot(zone, sessions, at=iso(instant)) == live, instant

    # Explain: the chain that grants s2's scope, as of the instant after e2 was created.
    after_e2 = iso(recorded[2][0])
    explained = await get(zone, f"agents/{s2}/effective-authority", at=after_e2, explain="true")
    assert explained["effective_scopes"] == ["read"]
    assert explained["explanation"]["scopes"] == {"read": [[e1, e2]]}
    assert [(e["edge_id"], e["contributes"], e["reason"]) for e in explained["explanation"]["edges"]] == [
        (e2, True, None)]
    # ... and now: e2 went with the revoke of e1; e3 lapsed; e4 ended with its source s4.
    now_s2 = (await get(zone, f"agents/{s2}/effective-authority", explain="true"))["explanation"]
    assert [(e["edge_id"], e["contributes"], e["reason"]) for e in now_s2["edges"]] == [(e2, False, "revoked")]
    assert now_s2["edges"][0]["status_reason"] == f"revoked with the cascade of {e1}"
    now_s3 = (await get(zone, f"agents/{s3}/effective-authority", explain="true"))["explanation"]
    assert [(e["edge_id"], e["reason"]) for e in now_s3["edges"]] == [(e3, "expired")]
    now_s5 = (await get(zone, f"agents/{s5}/effective-authority", explain="true"))["explanation"]
    assert [(e["edge_id"], e["reason"], e["source_status"]) for e in now_s5["edges"]] == [
        (e4, "source_terminated", "terminated")]

    # The session as it was while suspended, with who changed it and why.
    suspended_then = await get(zone, f"agents/{s2}", at=iso(recorded[4][0]))
    assert suspended_then["status"] == "suspended"
    assert [c["status"] for c in suspended_then["status_history"]] == ["active", "suspended"]
    assert suspended_then["status_history"][1]["actor"] == "app-1/app-1"  # client_id/subject of the token


async def test_at_outside_the_window_answers_400(zone: Zone) -> None:
    sid = await new_session(zone)
    window = await get(zone, "history/window")
    assert window["earliest"] < window["latest"]
    future = iso(datetime.now(timezone.utc) + timedelta(hours=1))
    for path in (f"agents/{sid}/effective-authority", "delegations/active", f"delegations/inbound/{sid}",
                 f"agents/{sid}"):
        r = await zone.http.get(f"/zones/{zone.id}/{path}", params={"at": future}, headers=zone.operator_headers)
        assert r.status_code == 400 and r.json()["error"] == "at_in_future", r.text
        r = await zone.http.get(f"/zones/{zone.id}/{path}", params={"at": "2001-01-01T00:00:00Z"},
                                headers=zone.operator_headers)
        assert r.status_code == 400 and r.json()["error"] == "at_outside_history", r.text
        r = await zone.http.get(f"/zones/{zone.id}/{path}", params={"at": "yesterday"}, headers=zone.operator_headers)
        assert r.status_code == 400 and r.json()["error"] == "invalid_query", r.text


async def test_a_session_that_did_not_exist_yet_is_not_found_then(zone: Zone) -> None:
    before = iso(await db_now(zone))
    await asyncio.sleep(0.01)
    sid = await new_session(zone)
    r = await zone.http.get(f"/zones/{zone.id}/agents/{sid}", params={"at": before}, headers=zone.operator_headers)
    assert r.status_code == 404 and r.json()["error"] == "session_not_found"
