"""Bulk revocation (`POST /zones/{z}/delegations/bulk-revoke`) through the HTTP API: the preview and
the real call agree exactly, a moved graph answers 409, one transaction with its audit record, an
event for every edge, an Idempotency-Key, a maximum size, who may call it, and the workflows of the
sessions it ends."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from storage.event_feed import DELEGATIONS_INVALIDATE
from tests.conftest import Zone, eventually
from tests.test_delegations_api import edge, edge_row, new_session


def bulk_url(zone: Zone) -> str:
    return f"/zones/{zone.id}/delegations/bulk-revoke"


async def bulk(zone: Zone, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return await zone.http.post(bulk_url(zone), json=body, headers=headers or zone.operator_headers)


async def seed_graph(zone: Zone) -> dict[str, str]:
    """s0 -e1(write)-> a -e2-> b; s0 -e3-> c; c -e5-> a; d -e4(write)-> e. Filter scope=write matches
    e1 and e4; e2 is downstream of e1; a, b and e end; e5 touches a and goes with it; e3 stays."""
    s0, a, b, c, d, e = [await new_session(zone) for _ in range(6)]
    ids = {"s0": s0, "a": a, "b": b, "c": c, "d": d, "e": e}
    ids["e1"] = (await edge(zone, s0, a, resource_id="files", scopes=["read", "write"],
                            constraints={"max_hops": 3}))["delegation_edge_id"]
    ids["e2"] = (await edge(zone, a, b, resource_id="files", scopes=["read"], parent_edge_id=ids["e1"],
                            ttl_seconds=300, constraints={"max_hops": 2}))["delegation_edge_id"]
    ids["e3"] = (await edge(zone, s0, c, constraints={"max_hops": 2}))["delegation_edge_id"]
    ids["e5"] = (await edge(zone, c, a, ttl_seconds=300))["delegation_edge_id"]
    ids["e4"] = (await edge(zone, d, e, resource_id="files", scopes=["write"]))["delegation_edge_id"]
    return ids


async def test_preview_and_revocation_agree_and_the_workflows_converge(zone: Zone) -> None:
    g = await seed_graph(zone)
    r = await bulk(zone, {"filter": {"scope": "write"}, "dry_run": True})
    assert r.status_code == 200, r.text
    preview = r.json()
    assert preview["matched_edges"] == sorted([g["e1"], g["e4"]])
    assert preview["downstream_edges"] == sorted([g["e2"], g["e5"]])
    assert preview["terminated_sessions"] == sorted([g["a"], g["b"], g["e"]])
    assert preview["counts"] == {"matched": 2, "downstream": 2, "terminated_sessions": 3}
    assert preview["within_limit"] is True
    assert (await edge_row(zone, g["e1"]))["status"] == "active"  # a preview changes nothing

    key = str(uuid.uuid4())
    real = await zone.http.post(bulk_url(zone), headers={**zone.operator_headers, "Idempotency-Key": key},
                                json={"filter": {"scope": "write"}, "expected_epoch": preview["epoch"]})
    assert real.status_code == 200, real.text
    done = real.json()
    for field in ("matched_edges", "downstream_edges", "terminated_sessions", "counts"):
        assert done[field] == preview[field], field
    assert done["dry_run"] is False and done["epoch"] > preview["epoch"]
    for name in ("e1", "e2", "e4", "e5"):
        assert (await edge_row(zone, g[name]))["status"] == "revoked", name
    assert (await edge_row(zone, g["e3"]))["status"] == "active"
    for name in ("a", "b", "e"):
        assert (await zone.session_row(g[name]))["status"] == "terminated", name
    for name in ("s0", "c", "d"):
        assert (await zone.session_row(g[name]))["status"] == "active", name

    record = await zone.stack.db.fetchrow("SELECT * FROM bulk_revocations WHERE id = %s", (done["bulk_revocation_id"],))
    assert record["filter_json"] == {"scope": "write"}
    assert record["counts_json"] == done["counts"]
    assert record["actor"] == "caracal-operator/caracal-operator"
    events = {e["dedupe_key"] for e in await zone.events(DELEGATIONS_INVALIDATE)}
    for name in ("e1", "e2", "e4"):
        assert f"bulk_revoke:{done['bulk_revocation_id']}:{g[name]}" in events
    assert f"edge_revoke:{g['e5']}" in events  # revoked with its endpoint a
    audit = await zone.stack.db.fetchval(
        "SELECT count(*) FROM admin_audit_events WHERE zone_id = %s AND path = %s", (zone.id, bulk_url(zone)))
    assert audit == 2  # the preview and the revocation

    # The same key answers the same body and does nothing more.
    again = await zone.http.post(bulk_url(zone), headers={**zone.operator_headers, "Idempotency-Key": key},
                                 json={"filter": {"scope": "write"}, "expected_epoch": preview["epoch"]})
    assert again.status_code == 200 and again.json() == done
    assert await zone.stack.db.fetchval("SELECT count(*) FROM bulk_revocations WHERE zone_id = %s", (zone.id,)) == 1

    for name in ("a", "b", "e"):
        assert await eventually(lambda n=name: _workflow_is(zone, g[n], "terminated"), timeout=20), name


async def _workflow_is(zone: Zone, session_id: str, status: str) -> bool:
    return await zone.workflow_status(session_id) == status


async def test_a_moved_graph_answers_409_and_changes_nothing(zone: Zone) -> None:
    g = await seed_graph(zone)
    preview = (await bulk(zone, {"filter": {"scope": "write"}, "dry_run": True})).json()
    await edge(zone, g["s0"], g["d"], resource_id="files", scopes=["write"])  # the graph moves
    r = await bulk(zone, {"filter": {"scope": "write"}, "expected_epoch": preview["epoch"]})
    assert r.status_code == 409 and r.json()["error"] == "delegation_graph_changed", r.text
    assert (await edge_row(zone, g["e1"]))["status"] == "active"
    assert await zone.stack.db.fetchval("SELECT count(*) FROM bulk_revocations WHERE zone_id = %s", (zone.id,)) == 0


async def test_refusals(zone: Zone) -> None:
    g = await seed_graph(zone)
    r = await bulk(zone, {"filter": {"scope": "write"}, "dry_run": True}, headers=zone.headers())
    assert r.status_code == 403 and r.json()["error"] == "bulk_revoke_permission_required"
    admin = zone.headers(scopes=["coordinator.admin"])
    assert (await bulk(zone, {"filter": {"scope": "write"}, "dry_run": True}, headers=admin)).status_code == 200
    r = await bulk(zone, {"filter": {}, "dry_run": True})
    assert r.status_code == 400 and r.json()["error"] == "bulk_filter_empty"
    r = await bulk(zone, {"filter": {"scope": "write"}})
    assert r.status_code == 400 and r.json()["error"] == "expected_epoch_required"
    r = await bulk(zone, {"filter": {"scope": "write", "colour": "red"}, "dry_run": True})
    assert r.status_code == 400, r.text
    r = await bulk(zone, {"filter": {"created_before": "last week"}, "dry_run": True})
    assert r.status_code == 400, r.text

    settings = zone.stack.settings
    limit = settings.BULK_REVOKE_MAX_EDGES
    settings.BULK_REVOKE_MAX_EDGES = 3
    try:
        preview = (await bulk(zone, {"filter": {"scope": "write"}, "dry_run": True})).json()
        assert preview["within_limit"] is False and preview["max_edges"] == 3
        r = await bulk(zone, {"filter": {"scope": "write"}, "expected_epoch": preview["epoch"]})
        assert r.status_code == 422 and r.json() == {"error": "bulk_revoke_too_large", "edges": 4, "max_edges": 3}
    finally:
        settings.BULK_REVOKE_MAX_EDGES = limit
    assert (await edge_row(zone, g["e1"]))["status"] == "active"


async def test_filters(zone: Zone) -> None:
    g = await seed_graph(zone)

    async def matched(**flt: Any) -> list[str]:
        r = await bulk(zone, {"filter": flt, "dry_run": True})
        assert r.status_code == 200, r.text
        return r.json()["matched_edges"]

    assert await matched(resource_id="urn:a") == sorted([g["e3"], g["e5"]])  # by identifier
    assert await matched(resource_id="res-1") == sorted([g["e3"], g["e5"]])  # by row id
    assert await matched(source_subtree_of=g["d"]) == [g["e4"]]
    assert await matched(issuer_application_id="app-2") == []
    e3_created = (await edge_row(zone, g["e3"]))["created_at"].isoformat()
    assert await matched(created_after=e3_created, scope="read") == sorted([g["e3"], g["e5"]])
    assert await matched(created_before=e3_created, scope="read") == sorted([g["e1"], g["e2"]])
