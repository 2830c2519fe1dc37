from tests.conftest import Zone, eventually


async def test_service_heartbeat_lease_and_invocation_smoke(zone: Zone):
    svc = await zone.start(lifecycle="service")
    sid = svc["agent_session_id"]
    assert svc["lease_generation"] == 1 and svc["ttl_seconds"] is None
    r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/heartbeat", json={"lease_generation": 1},
                             headers=zone.headers())
    assert r.status_code == 200, r.text
    assert r.json()["agent"]["lease_generation"] == 1
    r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/lease", headers=zone.headers())
    assert r.status_code == 200 and r.json()["lease_generation"] == 2, r.text
    r = await zone.http.post(f"/zones/{zone.id}/agents/{sid}/heartbeat", json={"lease_generation": 1},
                             headers=zone.headers())
    assert r.status_code == 409 and r.json()["error"] == "session_lease_fenced"

    r = await zone.http.post(f"/zones/{zone.id}/agent-services", headers=zone.headers(),
                             json={"application_id": "app-1", "endpoint_url": "https://svc.example/run"})
    assert r.status_code == 201, r.text
    service_id = r.json()["id"]
    task = await zone.start()
    r = await zone.http.post(f"/zones/{zone.id}/invocations", headers=zone.headers(), json={
        "service_id": service_id, "idempotency_key": "idem-1", "method": "run",
        "source_session_id": task["agent_session_id"], "timeout_ms": 500,
        "retry_policy": {"max_attempts": 1}})
    assert r.status_code == 201, r.text
    inv = r.json()["id"]
    r = await zone.http.patch(f"/zones/{zone.id}/invocations/{inv}/start", headers=zone.headers())
    assert r.status_code == 200 and r.json()["status"] == "running", r.text

    async def timed_out():
        r = await zone.http.get(f"/zones/{zone.id}/invocations/{inv}", headers=zone.headers())
        return r.json()["status"] == "timed_out"
    await eventually(timed_out, timeout=3)
