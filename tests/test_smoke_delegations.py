from tests.conftest import Zone


async def test_delegate_and_revoke_cascade_smoke(zone: Zone):
    a = (await zone.start())["agent_session_id"]
    h2 = zone.headers("app-2", "ar-2")
    b = (await zone.start(app="app-2", headers=h2, subject_session_id="ar-2"))["agent_session_id"]
    c = (await zone.start(app="app-2", headers=h2, subject_session_id="ar-2"))["agent_session_id"]
    h1 = zone.headers("app-1", scopes=["coordinator.delegate_to:app-2"])
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=h1, json={
        "source_session_id": a, "target_session_id": b, "issuer_application_id": "app-1",
        "receiver_application_id": "app-2", "resource_id": "urn:a", "scopes": ["read"],
        "constraints": {"max_hops": 3}, "ttl_seconds": 600})
    assert r.status_code == 201, r.text
    e1 = r.json()["delegation_edge_id"]
    assert r.json()["resource_id"] == "res-1"
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=zone.headers("app-2", "ar-2"), json={
        "source_session_id": b, "target_session_id": c, "issuer_application_id": "app-2",
        "receiver_application_id": "app-2", "resource_id": "res-1", "scopes": ["read"],
        "constraints": {"max_hops": 2}, "ttl_seconds": 300})
    assert r.status_code == 201, r.text
    assert r.json()["parent_edge_id"] == e1
    r = await zone.http.get(f"/zones/{zone.id}/agents/{c}/effective-authority", headers=zone.headers())
    assert r.json()["effective_scopes"] == ["read"], r.text
    r = await zone.http.get(f"/zones/{zone.id}/delegations/{e1}/impact", headers=zone.operator_headers)
    assert r.status_code == 200 and r.json()["affected_sessions"] == [b, c], r.text
    r = await zone.http.patch(f"/zones/{zone.id}/delegations/{e1}/revoke", headers=h1)
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked_edges": 2, "affected_sessions": 1, "terminated_sessions": 2}
    assert (await zone.session_row(c))["status"] == "terminated"


async def test_edge_expiry_settles_by_maintenance_schedule(zone: Zone):
    import asyncio
    import time

    a = (await zone.start())["agent_session_id"]
    b = (await zone.start())["agent_session_id"]
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=zone.headers(), json={
        "source_session_id": a, "target_session_id": b, "issuer_application_id": "app-1",
        "receiver_application_id": "app-1", "resource_id": "res-1", "scopes": ["read"], "ttl_seconds": 1})
    assert r.status_code == 201, r.text
    edge = r.json()["delegation_edge_id"]
    deadline = time.monotonic() + 1 + 10
    while time.monotonic() < deadline:
        row = await zone.stack.db.fetchrow("SELECT status FROM delegation_edges WHERE id = %s", (edge,))
        if row["status"] == "expired":
            break
        await asyncio.sleep(0.2)
    assert row["status"] == "expired"
    events = [e for e in await zone.events("caracal.delegations.invalidate")
              if e["payload_json"]["event"] == "edge_expire"]
    assert len(events) == 1 and events[0]["payload_json"]["edge_ids"] == [edge]
