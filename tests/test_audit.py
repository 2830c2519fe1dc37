"""Admin audit (reference §11.1, §13 cases 116-117): hash chain per zone, written before the
response of a successful mutation, best-effort after a failure; the verification command."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from storage.audit import AuditEntry, AuditUnavailable, append, chain_key, content_sha256, verify_chain
from tests.conftest import Zone, eventually, seed_zone

ROOT = Path(__file__).resolve().parent.parent
AUDIT_KEY = "a1" * 32


async def _records(zone: Zone) -> list[dict]:
    return await zone.stack.db.fetch("SELECT * FROM admin_audit_events WHERE zone_id = %s ORDER BY chain_seq",
                                     (zone.id,))


def _run_verify(database_url: str, zone_id: str, key: str | None = AUDIT_KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("AUDIT_HMAC_KEY", "AUDIT_HMAC_KEY_FILE")}
    env["DATABASE_URL"] = database_url
    if key:
        env["AUDIT_HMAC_KEY"] = key
    return subprocess.run([sys.executable, "-m", "devstack.audit_verify", "--zone", zone_id], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_successful_suspend_appends_one_linked_record(zone: Zone):
    sid = (await zone.start())["agent_session_id"]
    before = await _records(zone)
    assert before, "the zone's seeding (operator PUTs) and the session start are audited"
    start = before[-1]
    assert start["action"] == f"POST /zones/{zone.id}/agents" and start["entity_type"] is None
    assert start["status_code"] == 201 and start["actor_name"] == "app-1"

    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers(),
                              params={"ignored": "query"})
    assert r.status_code == 200, r.text
    after = await _records(zone)
    assert len(after) == len(before) + 1
    rec = after[-1]
    assert (rec["entity_type"], rec["entity_id"]) == ("agents", sid)
    assert rec["actor_id"] == "app-1" and rec["actor_name"] == "app-1"  # sub, client_id
    assert set(rec["actor_scope"].split()) == {"agent:lifecycle"}
    assert rec["status_code"] == 200 and rec["method"] == "PATCH"
    assert rec["path"] == f"/zones/{zone.id}/agents/{sid}/suspend"  # no query
    assert rec["action"] == f"PATCH {rec['path']}"
    assert rec["request_id"] == r.headers["x-request-id"]
    assert rec["chain_seq"] == start["chain_seq"] + 1
    assert rec["prev_content_sha256"] == start["content_sha256"]
    assert rec["content_sha256"] == content_sha256(rec)
    assert rec["chain_hmac"] is None  # no AUDIT_HMAC_KEY in this stack
    head = await zone.stack.db.fetchrow("SELECT * FROM admin_audit_heads WHERE chain_key = %s", (chain_key(zone.id),))
    assert (head["chain_seq"], head["content_sha256"]) == (rec["chain_seq"], rec["content_sha256"])
    assert (await verify_chain(zone.stack.db, zone.id, None)).ok


async def test_audit_failure_answers_500_and_the_suspension_stays(zone: Zone):
    sid = (await zone.start())["agent_session_id"]
    db = zone.stack.db
    fn = f"audit_fail_{uuid.uuid4().hex[:8]}"
    await db.execute(f"""CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'audit storage refused (test)'; END $$""")
    await db.execute(f"""CREATE TRIGGER {fn} BEFORE INSERT ON admin_audit_events FOR EACH ROW
        WHEN (NEW.zone_id = '{zone.id}') EXECUTE FUNCTION {fn}()""")
    try:
        r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers())
    finally:
        await db.execute(f"DROP TRIGGER {fn} ON admin_audit_events")
        await db.execute(f"DROP FUNCTION {fn}()")
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["error"] == "audit_unavailable" and body["message"]
    assert (await zone.session_row(sid))["status"] == "suspended"  # the mutation is committed
    assert (await verify_chain(db, zone.id, None)).ok  # the failed insert left the chain intact


async def test_a_failed_standalone_append_raises_and_leaves_the_chain_as_it_was(stack):
    """`append` on its own (the middleware's path for directory writes and failures): a refused
    insert raises AuditUnavailable, writes nothing and leaves the head where it was."""
    zone_id = f"z-audit-fail-{uuid.uuid4().hex[:8]}"
    entry = AuditEntry("req-1", "sub", "app-1", "agent:lifecycle", "POST", f"/zones/{zone_id}/agents", zone_id,
                       None, None, 201)
    first = await append(stack.db, entry, None)
    fn = f"audit_fail_{uuid.uuid4().hex[:8]}"
    await stack.db.execute(f"""CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'audit storage refused (test)'; END $$""")
    await stack.db.execute(f"""CREATE TRIGGER {fn} BEFORE INSERT ON admin_audit_events FOR EACH ROW
        WHEN (NEW.zone_id = '{zone_id}') EXECUTE FUNCTION {fn}()""")
    try:
        with pytest.raises(AuditUnavailable):
            await append(stack.db, entry, None)
    finally:
        await stack.db.execute(f"DROP TRIGGER {fn} ON admin_audit_events")
        await stack.db.execute(f"DROP FUNCTION {fn}()")
    head = await stack.db.fetchrow("SELECT * FROM admin_audit_heads WHERE chain_key = %s", (chain_key(zone_id),))
    assert (head["chain_seq"], head["content_sha256"]) == (1, first["content_sha256"])
    assert (await append(stack.db, entry, None))["chain_seq"] == 2
    report = await verify_chain(stack.db, zone_id, None)
    assert report.ok and report.records == 2, report.describe()


async def test_a_command_and_its_record_commit_together(zone: Zone):
    """The suspend's record is written with the suspend's own COMMIT: while another transaction holds
    the zone's chain head, neither the suspension nor its record is visible; once it lets go, both
    are, and there is exactly one record (the middleware does not write a second)."""
    sid = (await zone.start())["agent_session_id"]
    count = len(await _records(zone))
    async with zone.stack.db.connection() as holder:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM admin_audit_heads WHERE chain_key = %s FOR UPDATE", (chain_key(zone.id),))
        request = asyncio.create_task(zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers()))
        await asyncio.sleep(1.0)
        assert not request.done()
        assert (await zone.session_row(sid))["status"] == "active"  # not committed without its record
        assert len(await _records(zone)) == count
        await holder.execute("ROLLBACK")
    r = await request
    assert r.status_code == 200, r.text
    assert (await zone.session_row(sid))["status"] == "suspended"
    records = await _records(zone)
    assert len(records) == count + 1
    assert (records[-1]["method"], records[-1]["status_code"], records[-1]["entity_id"]) == ("PATCH", 200, sid)


async def test_each_command_records_its_own_status_once(zone: Zone):
    """Creates record 201 and a terminate 204 (the answer's status), one record per request."""
    count = len(await _records(zone))
    a = (await zone.start())["agent_session_id"]
    b = (await zone.start())["agent_session_id"]
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=zone.headers(scopes=[
        "agent:lifecycle", "coordinator.delegate_broad"]), json={
        "source_session_id": a, "target_session_id": b, "issuer_application_id": "app-1",
        "receiver_application_id": "app-1", "scopes": ["read"], "ttl_seconds": 600})
    assert r.status_code == 201, r.text
    r = await zone.http.delete(f"/zones/{zone.id}/agents/{b}", headers=zone.headers())
    assert r.status_code == 204, r.text
    records = (await _records(zone))[count:]
    assert [(x["method"], x["status_code"], x["entity_type"]) for x in records] == [
        ("POST", 201, None), ("POST", 201, None), ("POST", 201, None), ("DELETE", 204, "agents")]
    assert records[2]["path"] == f"/zones/{zone.id}/delegations"
    assert (await verify_chain(zone.stack.db, zone.id, None)).ok


async def test_successful_get_is_not_recorded_but_a_failed_one_is(zone: Zone):
    sid = (await zone.start())["agent_session_id"]
    count = len(await _records(zone))
    r = await zone.http.get(f"/zones/{zone.id}/agents/{sid}", headers=zone.headers())
    assert r.status_code == 200
    assert len(await _records(zone)) == count

    r = await zone.http.get(f"/zones/{zone.id}/agents/ghost", headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    records = await eventually(lambda: _more_than(zone, count))
    rec = records[-1]
    assert (rec["method"], rec["status_code"], rec["entity_type"], rec["entity_id"]) == ("GET", 404, "agents", "ghost")

    # no identity, no record: a missing bearer is refused before anyone is known
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend")
    assert r.status_code == 401
    # a failed mutation by a known caller is recorded too
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/suspend", headers=zone.headers(app="app-2"))
    assert r.status_code == 403
    records = await eventually(lambda: _more_than(zone, count + 1))
    assert len(records) == count + 2 and records[-1]["status_code"] == 403 and records[-1]["actor_name"] == "app-2"
    assert (await verify_chain(zone.stack.db, zone.id, None)).ok


async def _more_than(zone: Zone, n: int):
    records = await _records(zone)
    return records if len(records) > n else None


async def test_exempt_paths_are_not_recorded(zone: Zone):
    before = await zone.stack.db.fetchval(
        "SELECT count(*) FROM admin_audit_events WHERE path IN ('/metrics', '/stats')")
    r = await zone.http.get("/metrics", headers=zone.operator_headers)
    assert r.status_code in (200, 401)
    r = await zone.http.get("/metrics", headers=zone.headers())
    assert r.status_code == 403
    after = await zone.stack.db.fetchval("SELECT count(*) FROM admin_audit_events WHERE path IN ('/metrics', '/stats')")
    assert after == before


async def test_concurrent_appends_make_one_unbroken_chain(stack):
    zone_id = f"z-audit-{uuid.uuid4().hex[:8]}"
    key = bytes.fromhex(AUDIT_KEY)

    async def one(i: int):
        return await append(stack.db, AuditEntry(f"req-{i}", "sub", "app-1", "agent:lifecycle", "POST",
                                                 f"/zones/{zone_id}/agents", zone_id, None, None, 201), key)

    written = await asyncio.gather(*(one(i) for i in range(120)))
    assert sorted(r["chain_seq"] for r in written) == list(range(1, 121))
    report = await verify_chain(stack.db, zone_id, key)
    assert report.ok and report.records == 120, report.describe()
    # Postgres' HMAC (from padded keys) is the standard one
    first = next(r for r in written if r["chain_seq"] == 1)
    assert first["chain_hmac"] == hmac.new(key, f"{first['content_sha256']}|".encode(), hashlib.sha256).hexdigest()
    # a wrong key does not verify
    assert not (await verify_chain(stack.db, zone_id, b"\x00" * 32)).ok


async def test_verification_command_finds_the_first_broken_link(stack_factory, signing_key):
    s = await stack_factory(AUDIT_HMAC_KEY=AUDIT_KEY)
    try:
        zone = await seed_zone(s, signing_key)
        sid = (await zone.start())["agent_session_id"]
        for action in ("suspend", "resume", "suspend"):
            r = await zone.http.patch(f"/zones/{zone.id}/agents/{sid}/{action}", headers=zone.headers())
            assert r.status_code == 200, r.text
        records = await _records(zone)
        assert len(records) >= 10 and all(rec["chain_hmac"] for rec in records)
        url = s.settings.DATABASE_URL

        done = await asyncio.to_thread(_run_verify, url, zone.id)
        assert done.returncode == 0 and done.stdout.startswith("OK"), (done.stdout, done.stderr)
        assert f"{len(records)} records" in done.stdout

        # 1. alter a field: the record's own hash no longer matches
        target = records[4]
        await s.db.execute("UPDATE admin_audit_events SET actor_id = 'mallory' WHERE id = %s", (target["id"],))
        done = await asyncio.to_thread(_run_verify, url, zone.id)
        assert done.returncode == 1, done.stdout
        assert f"at chain_seq {target['chain_seq']} (id {target['id']})" in done.stdout
        assert "content_sha256" in done.stdout

        # 2. an attacker without the key recomputes that record's hash and relinks the next one:
        #    the hashes agree again, the HMAC does not
        altered = dict(target, actor_id="mallory")
        new_hash = content_sha256(altered)
        nxt = records[5]
        await s.db.execute("UPDATE admin_audit_events SET content_sha256 = %s WHERE id = %s", (new_hash, target["id"]))
        await s.db.execute("UPDATE admin_audit_events SET prev_content_sha256 = %s WHERE id = %s",
                           (new_hash, nxt["id"]))
        key = bytes.fromhex(AUDIT_KEY)
        report = await verify_chain(s.db, zone.id, key)
        assert report.broken_seq == target["chain_seq"] and "chain_hmac" in report.describe()
        # without the key, only hashes and links are checked, and those were made consistent
        assert (await verify_chain(s.db, zone.id, None)).ok

        # 3. the last record removed: the head gives it away
        await s.db.execute("UPDATE admin_audit_events SET actor_id = %s, content_sha256 = %s WHERE id = %s",
                           (target["actor_id"], target["content_sha256"], target["id"]))
        await s.db.execute("UPDATE admin_audit_events SET prev_content_sha256 = %s WHERE id = %s",
                           (target["content_sha256"], nxt["id"]))
        assert (await verify_chain(s.db, zone.id, key)).ok
        await s.db.execute("DELETE FROM admin_audit_events WHERE id = %s", (records[-1]["id"],))
        report = await verify_chain(s.db, zone.id, key)
        assert not report.ok and "head" in report.describe()
        # a record removed from the middle: the sequence breaks there
        await s.db.execute("DELETE FROM admin_audit_events WHERE id = %s", (records[2]["id"],))
        report = await verify_chain(s.db, zone.id, key)
        assert not report.ok and report.broken_seq == records[3]["chain_seq"]
    finally:
        await s.close()
