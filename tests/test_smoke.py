from tests.conftest import Zone, eventually


async def test_session_lifecycle_smoke(zone: Zone):
    root = await zone.start()
    sid = root["agent_session_id"]
    assert root["status"] == "active" and root["lifecycle"] == "task" and root["ttl_seconds"] == 3600
    child = await zone.start(parent_id=sid)
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"suspended": 2}, r.text
    assert await eventually(lambda: _is(zone, child["agent_session_id"], "suspended"))
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/resume", headers=zone.headers())
    assert r.json() == {"resumed": 2}, r.text
    r = await zone.http.delete(f"/zones/{zone.id}/agents/{sid}", headers=zone.headers())
    assert r.status_code == 204, r.text
    row = await zone.session_row(child["agent_session_id"])
    assert row["status"] == "terminated" and row["termination_reason"] == "parent_terminated"


async def _is(zone: Zone, session_id: str, status: str) -> bool:
    return await zone.workflow_status(session_id) == status
