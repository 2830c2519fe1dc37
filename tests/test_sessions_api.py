"""Session acceptance tests through the HTTP API (reference-behaviour §4.4-4.10, §5.1-5.3, §7, §8;
§13 cases 19-37, 42-59), plus what docs/DESIGN.md promises beyond the reference: per-transition outbox
keys, TTL expiry by a durable timer, workflows that follow every cascade.

Each test asserts the HTTP answer, the rows in Postgres, the outbox and, where it matters, the
session workflows. Bulk preconditions (capacity counts, receipt quotas) are written with SQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey

from rules import workflow_contract as wc
from rules.idempotency import key_digest
from rules.timefmt import iso_ms
from settings import DEV_IDEMPOTENCY_HMAC_KEY
from storage.pages import iso_ms_sql
from storage.event_feed import AGENTS_LIFECYCLE, DELEGATIONS_INVALIDATE, SESSIONS_REVOKE
from storage.maintenance import missing_candidates, start_missing
from storage.notices import SNAPSHOT_COLUMNS, fanout_sql, session_snapshot
from tests.conftest import Zone, eventually, seed_zone

ROTATED_HMAC_KEY = hashlib.sha256(b"rotated idempotency key").hexdigest()


# ---------------------------------------------------------------------------------------------- helpers


def now() -> datetime:
    return datetime.now(timezone.utc)


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def sid(body: dict[str, Any]) -> str:
    return body["agent_session_id"]


def url(zone: Zone, *parts: str) -> str:
    return "/".join([f"/zones/{zone.id}/agents", *parts])


async def post_start(zone: Zone, body: dict[str, Any], headers: dict[str, str] | None = None, *,
                     http=None):
    return await (http or zone.http).post(url(zone), json=body, headers=headers or zone.headers())


async def bulk_sessions(zone: Zone, n: int, app: str = "app-1", *, status: str = "active", lifecycle: str = "task",
                        age_s: float = 0, ttl: int | None = 3600, deadline_in: float | None = None,
                        ar: str = "ar-1") -> None:
    """`n` session rows written directly (no workflow): preconditions for capacity counts."""
    await zone.stack.db.execute("""
        INSERT INTO sessions (id, zone_id, application_id, root_id, subject_authority_record_id, status, lifecycle,
                              started_at, ttl_seconds, last_heartbeat_at, heartbeat_deadline_at, metadata_json,
                              terminated_at)
        SELECT x.id, %(zone)s, %(app)s, x.id, %(ar)s, %(status)s, %(lifecycle)s,
               now() - make_interval(secs => %(age)s), %(ttl)s,
               CASE WHEN %(deadline)s::float8 IS NOT NULL THEN now() END,
               now() + make_interval(secs => %(deadline)s::float8), '{}',
               CASE WHEN %(status)s IN ('terminated', 'expired') THEN now() END
        FROM (SELECT 'bulk-' || gen_random_uuid()::text AS id FROM generate_series(1, %(n)s)) x""",
        {"zone": zone.id, "app": app, "ar": ar, "status": status, "lifecycle": lifecycle, "age": age_s,
         "ttl": ttl, "deadline": deadline_in, "n": n})


async def count(zone: Zone, sql: str, *params: Any) -> int:
    return await zone.stack.db.fetchval(sql, params)


async def session_count(zone: Zone) -> int:
    return await count(zone, "SELECT count(*) FROM sessions WHERE zone_id = %s", zone.id)


async def keys(zone: Zone, topic: str | None = None) -> list[str]:
    return [e["dedupe_key"] for e in await zone.events(topic)]


async def describe_status(zone: Zone, session_id: str) -> WorkflowExecutionStatus | None:
    return await zone.execution_status(session_id)


async def workflows_reach(zone: Zone, ids: list[str], status: str, timeout: float = 5.0) -> None:
    async def check() -> bool:
        states = await asyncio.gather(*(zone.workflow_status(i) for i in ids))
        return all(s == status for s in states)
    await eventually(check, timeout=timeout)


def close_to(value: datetime | None, expected: datetime, tolerance: float = 5.0) -> bool:
    return value is not None and abs((value - expected).total_seconds()) <= tolerance


@pytest.fixture(scope="module")
async def wide_stack(stack_factory):
    """A second API + worker: raised zone cap (case 29) and a rotated idempotency key (case 52),
    the previous key being the one the main stack writes with."""
    s = await stack_factory(MAX_AGENTS_PER_ZONE=250, IDEMPOTENCY_HMAC_KEY=ROTATED_HMAC_KEY,
                            IDEMPOTENCY_HMAC_KEY_PREVIOUS=DEV_IDEMPOTENCY_HMAC_KEY)
    yield s
    await s.close()


# ---------------------------------------------------------------------------------------------- start (19-27)


async def test_start_task_defaults_and_spawn_event(zone: Zone):  # 19
    before = now()
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
    assert r.status_code == 201, r.text
    assert "idempotency-replayed" not in r.headers
    body = r.json()
    assert body["agent_session_id"] and body["zone_id"] == zone.id and body["application_id"] == "app-1"
    assert {k: body[k] for k in ("status", "lifecycle", "ttl_seconds", "depth", "labels", "parent_id",
                                 "subject_authority_record_id", "last_heartbeat_at", "heartbeat_deadline_at",
                                 "delegation_edge_id")} == {
        "status": "active", "lifecycle": "task", "ttl_seconds": 3600, "depth": 0, "labels": [], "parent_id": None,
        "subject_authority_record_id": "ar-1", "last_heartbeat_at": None, "heartbeat_deadline_at": None,
        "delegation_edge_id": None}
    assert "metadata" not in body
    assert body["started_at"].endswith("Z") and len(body["started_at"]) == 24  # ms precision
    assert close_to(ts(body["started_at"]), before)

    row = await zone.session_row(sid(body))
    assert row["status"] == "active" and row["depth"] == 0 and row["max_children"] == 10
    assert row["child_count"] == 0 and row["metadata_json"] == {} and row["ttl_seconds"] == 3600
    assert row["parent_id"] is None and row["terminated_at"] is None and row["termination_reason"] is None

    events = await zone.events(AGENTS_LIFECYCLE)
    assert [(e["dedupe_key"], e["payload_json"]) for e in events] == [(f"spawn:{sid(body)}", {
        "event": "spawn", "zone_id": zone.id, "agent_session_id": sid(body), "parent_id": None,
        "application_id": "app-1"})]
    assert await zone.events(SESSIONS_REVOKE) == []

    r = await zone.http.get(url(zone, sid(body)), headers=zone.headers("app-2", "ar-2"))  # any caller may read
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["metadata"] == {} and full["terminated_at"] is None and full["termination_reason"] is None
    assert full["started_at"] == body["started_at"] and full["status"] == "active"
    assert await zone.workflow_status(sid(body)) == "active"

    r = await zone.http.get(url(zone, "unknown-session"), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}


async def test_read_bodies_rendered_by_postgres(zone: Zone):
    """GET, list and children are rendered as JSON by Postgres: the reference's fields, timestamps as
    `iso_ms` renders them (UTC, milliseconds truncated), metadata and labels as stored."""
    metadata = {"k": [1, {"x": None, "é": "日本\u2028"}], "big": 2**53, "f": 1.5, "nested": {"a": {"b": []}}}
    parent = await zone.start(lifecycle="service", labels=["blue"], metadata=metadata)
    child = await zone.start(parent_id=sid(parent), lifecycle="service")
    await zone.stack.db.execute(
        "UPDATE sessions SET started_at = %s, last_heartbeat_at = %s, heartbeat_deadline_at = %s WHERE id = %s",
        (datetime(2026, 6, 1, 12, 34, 56, 789999, tzinfo=timezone.utc),
         datetime(999, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc),
         datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))), sid(child)))
    created = {k: v for k, v in child.items() if k != "delegation_edge_id"}
    expected = {**created, "metadata": {}, "terminated_at": None, "termination_reason": None,
                "started_at": "2026-06-01T12:34:56.789Z", "last_heartbeat_at": "0999-01-02T03:04:05.006Z",
                "heartbeat_deadline_at": "2024-03-01T04:59:59.999Z"}
    r = await zone.http.get(url(zone, sid(child)), headers=zone.headers())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == expected and list(r.json()) == [
        "agent_session_id", "zone_id", "application_id", "parent_id", "subject_authority_record_id", "lifecycle",
        "labels", "status", "depth", "ttl_seconds", "metadata", "started_at", "terminated_at", "termination_reason",
        "last_heartbeat_at", "heartbeat_deadline_at", "lease_generation"]

    r = await zone.http.get(url(zone), params={"limit": 2}, headers=zone.headers())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    page = r.json()
    assert page["items"][0] == expected and page["next_cursor"] == sid(parent)
    assert b"\n" not in r.content  # one line, like every other answer
    assert page["items"][1]["metadata"] == metadata and page["items"][1]["labels"] == ["blue"]
    r = await zone.http.get(url(zone), params={"limit": 2, "cursor": sid(parent)}, headers=zone.headers())
    assert r.json() == {"items": [], "next_cursor": None}

    r = await zone.http.get(url(zone, sid(parent), "children"), headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"items": [
        {k: v for k, v in expected.items() if k not in ("terminated_at", "termination_reason")}], "next_cursor": None}


async def test_iso_ms_sql_renders_like_iso_ms(zone: Zone):
    """The SQL rendering of timestamps agrees with `rules.timefmt.iso_ms`, whatever the connection's time zone."""
    instants = [datetime(2026, 6, 1, 12, 34, 56, 789999, tzinfo=timezone.utc), datetime(999, 1, 2, tzinfo=timezone.utc),
                datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
                datetime(2026, 1, 1, 0, 0, 0, 999, tzinfo=timezone(timedelta(hours=2)))]
    async with zone.stack.db.transaction() as conn:
        await conn.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
        for instant in instants:
            cur = await conn.execute(f"SELECT {iso_ms_sql('%s::timestamptz')} AS text", (instant,))
            assert (await cur.fetchone()) == {"text": iso_ms(instant)}
        cur = await conn.execute(f"SELECT {iso_ms_sql('NULL::timestamptz')} AS text")
        assert (await cur.fetchone()) == {"text": None}


async def test_start_service_lease(zone: Zone):  # 20
    body = await zone.start(lifecycle="service", metadata={"k": [1, {"x": None}]})
    assert body["lifecycle"] == "service" and body["ttl_seconds"] is None
    assert close_to(ts(body["last_heartbeat_at"]), now())
    assert close_to(ts(body["heartbeat_deadline_at"]), now() + timedelta(seconds=120))
    row = await zone.session_row(sid(body))
    assert row["ttl_seconds"] is None and row["metadata_json"] == {"k": [1, {"x": None}]}
    assert (row["heartbeat_deadline_at"] - row["last_heartbeat_at"]).total_seconds() == pytest.approx(120, abs=0.01)
    # An explicit ttl is kept for services (not enforced).
    body = await zone.start(lifecycle="service", ttl_seconds=60)
    assert body["ttl_seconds"] == 60


async def test_root_start_answers_what_was_stored(zone: Zone):
    """A root start's answer and workflow notice are built before its row is written (the insert
    goes with the COMMIT, under the capacity lock): they must read exactly like the row."""
    for body in ({"lifecycle": "task", "ttl_seconds": 900, "labels": ["a", "b"]}, {"lifecycle": "service"}):
        created = await zone.start(**body)
        r = await zone.http.get(url(zone, sid(created)), headers=zone.headers())
        assert r.status_code == 200, r.text
        stored = r.json()
        for key in ("agent_session_id", "zone_id", "application_id", "parent_id", "subject_authority_record_id",
                    "lifecycle", "labels", "status", "depth", "ttl_seconds", "started_at", "last_heartbeat_at",
                    "heartbeat_deadline_at", "lease_generation"):
            assert created[key] == stored[key], (body, key)
        # The workflow's state came from the notice: it is the stored row's snapshot.
        state = await zone.workflow_state(f"session/{zone.id}/{sid(created)}")
        assert state == session_snapshot(await zone.session_row(sid(created)))


async def test_a_session_workflow_starts_with_the_build_ids_its_worker_reports(zone: Zone):
    """The dispatcher starts a workflow with the `BuildIds` its worker's first task reports, so the
    server has nothing to add to the workflow's visibility record at that task."""
    created = await zone.start()
    workflow_id = f"session/{zone.id}/{sid(created)}"
    assert await zone.workflow_state(workflow_id) is not None  # the first task has completed
    handle = zone.stack.client.get_workflow_handle(workflow_id)
    started = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes
    assert wc.SA_BUILD_IDS in started.search_attributes.indexed_fields  # set by the start itself
    description = await handle.describe()
    build_id = zone.stack.settings.worker_build_id
    assert description.raw_description.workflow_execution_info.most_recent_worker_version_stamp.build_id == build_id
    assert description.typed_search_attributes.get(SearchAttributeKey.for_keyword_list(wc.SA_BUILD_IDS)) == \
        ["unversioned", f"unversioned:{build_id}"]


async def test_a_new_session_workflow_starts_with_its_created_notice_and_its_first_task(zone: Zone):
    """The dispatcher starts a new session's workflow with the `created` notice in its input, and,
    its worker sharing the dispatcher's Temporal client, gets the first workflow task back in the
    start's answer (eager start): no signal, no trip through matching."""
    dispatcher = zone.stack.dispatcher
    eager_before = dispatcher.eager_started
    created = await zone.start()
    workflow_id = f"session/{zone.id}/{sid(created)}"
    assert await zone.workflow_state(workflow_id) == session_snapshot(await zone.session_row(sid(created)))
    events = (await zone.stack.client.get_workflow_handle(workflow_id).fetch_history()).events
    started = events[0].workflow_execution_started_event_attributes
    opening = json.loads(started.input.payloads[0].data)["opening"]
    assert [item["signal"] for item in opening] == [wc.SESSION_CREATED]
    assert opening[0]["notice"]["session"]["session_id"] == sid(created)
    assert not any(e.HasField("workflow_execution_signaled_event_attributes") for e in events)
    assert dispatcher.eager_started > eager_before


async def test_a_created_notice_for_a_workflow_that_already_runs_is_signalled(stack_factory, signing_key):
    """A workflow may exist before its `created` notice is delivered (a reconciler's sync started
    it): the start fails as already started and the notice goes by signal-with-start instead."""
    from storage.notices import session_notice

    s = await stack_factory()
    try:
        await s.stop_dispatcher()
        z = await seed_zone(s, signing_key)
        created = await z.start()
        row = await z.session_row(sid(created))
        sync = session_notice(row, wc.SESSION_SYNC, "a sync ahead of the created notice")
        handle = await s.client.start_workflow(
            wc.SESSION_WORKFLOW, sync.start_args, id=sync.workflow_id, task_queue=s.settings.TEMPORAL_TASK_QUEUE,
            start_signal=wc.SESSION_SYNC, start_signal_args=[sync.payload])
        await s.start_dispatcher()
        assert await z.workflow_state(sync.workflow_id) == session_snapshot(row)
        signals = [e.workflow_execution_signaled_event_attributes.signal_name
                   for e in (await handle.fetch_history()).events
                   if e.HasField("workflow_execution_signaled_event_attributes")]
        assert signals == [wc.SESSION_SYNC, wc.SESSION_CREATED]
    finally:
        await s.close()


async def test_subject_defaults_to_token_sid(zone: Zone):  # 21
    r = await post_start(zone, {"application_id": "app-1"}, zone.headers(sid=None))
    assert r.status_code == 400 and r.json() == {"error": "subject_session_id_required"}
    await zone.put("authority-records/sid-test", {"session_type": "user", "subject_id": "s",
                                                   "expires_at": "2099-01-01T00:00:00.000Z"})
    r = await post_start(zone, {"application_id": "app-1"}, zone.headers(sid="sid-test"))
    assert r.status_code == 201, r.text
    assert r.json()["subject_authority_record_id"] == "sid-test"
    # An explicit subject wins over the token's sid.
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-2"}, zone.headers(sid="sid-test"))
    assert r.status_code == 201 and r.json()["subject_authority_record_id"] == "ar-2"
    assert await session_count(zone) == 2


async def test_start_ownership(zone: Zone):  # 22
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    r = await post_start(zone, body, zone.headers("app-2", "ar-2", scopes=["coordinator.admin"]))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    r = await post_start(zone, body, zone.headers("app-2", "ar-2", scopes=["coordinator.spawn_for:app-2"]))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    assert await session_count(zone) == 0
    r = await post_start(zone, body, zone.headers("app-2", "ar-2", scopes=["coordinator.spawn_for:app-1"]))
    assert r.status_code == 201 and r.json()["application_id"] == "app-1"


async def test_labels_and_ttl_validation(zone: Zone):  # 23, 24
    bad = [{"labels": [f"l{i}" for i in range(33)]}, {"labels": ["x" * 65]}, {"labels": ["   "]}, {"labels": [1]},
           {"ttl_seconds": 0}, {"ttl_seconds": 86401}, {"ttl_seconds": "60"}, {"lifecycle": "daemon"},
           {"parent_authority": "all"}, {"metadata": []}, {"parent_id": ""}, {"subject_session_id": ""},
           {"application_id": ""}, {"inherit_parent_edge_id": ""}]
    for extra in bad:
        r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"] == "invalid_body" and r.json()["details"]["issues"], (extra, r.text)
    assert await session_count(zone) == 0
    body = await zone.start(labels=["  x ", "y" * 64, *[f"l{i}" for i in range(30)]], ttl_seconds=86400,
                            unknown_key="ignored")
    assert body["labels"][:2] == ["x", "y" * 64] and len(body["labels"]) == 32
    assert body["ttl_seconds"] == 86400
    assert list((await zone.session_row(sid(body)))["labels"])[:1] == ["x"]
    assert (await zone.start(ttl_seconds=1))["ttl_seconds"] == 1


async def test_application_must_be_live_in_zone(zone: Zone):  # 25
    past = (now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    await zone.put("applications/old-app", {"registration_method": "managed", "expires_at": past})
    other_zone = f"z-other-{uuid.uuid4().hex[:6]}"
    r = await zone.http.put(f"/zones/{other_zone}/applications/foreign-app", json={"registration_method": "managed"},
                            headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    r = await zone.http.post(f"/zones/{zone.id}/applications/app-2/archive", headers=zone.operator_headers)
    assert r.status_code == 200
    for app in ("app-2", "old-app", "foreign-app", "never-registered"):
        r = await post_start(zone, {"application_id": app, "subject_session_id": "ar-1"},
                             zone.headers(scopes=[f"coordinator.spawn_for:{app}"]))
        assert r.status_code == 404 and r.json() == {"error": "application_not_found"}, (app, r.text)
    assert await session_count(zone) == 0
    assert await count(zone, "SELECT count(*) FROM caracal_outbox WHERE zone_id = %s", zone.id) == 0


async def test_authority_record_must_be_live_in_zone(zone: Zone):  # 26
    past = (now() - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    await zone.put("authority-records/ar-old", {"session_type": "user", "subject_id": "s", "expires_at": past})
    r = await zone.http.post(f"/zones/{zone.id}/authority-records/ar-2/revoke", headers=zone.operator_headers)
    assert r.status_code == 200
    other_zone = f"z-other-{uuid.uuid4().hex[:6]}"
    r = await zone.http.put(f"/zones/{other_zone}/authority-records/ar-foreign",
                            json={"session_type": "user", "subject_id": "s", "expires_at": "2099-01-01T00:00:00Z"},
                            headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    for record in ("ar-2", "ar-old", "ar-foreign", "ar-never"):
        r = await post_start(zone, {"application_id": "app-1", "subject_session_id": record})
        assert r.status_code == 404, (record, r.text)
        body = r.json()
        assert body["error"] == "session_not_found" and isinstance(body.get("detail"), str) and body["detail"]
    assert await session_count(zone) == 0


async def test_dcr_application_rules(zone: Zone):  # 27
    dcr = zone.headers("dcr-app")
    r = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1", "lifecycle": "service"}, dcr)
    assert r.status_code == 409 and r.json() == {"error": "dcr_application_cannot_host_service"}
    parent = await zone.start()
    r = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1",
                                "parent_id": sid(parent)}, dcr)
    assert r.status_code == 409 and r.json() == {"error": "dcr_application_cannot_be_child"}
    bound = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1"}, dcr)
    assert bound.status_code == 201, bound.text
    r = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1"}, dcr)
    assert r.status_code == 409 and r.json() == {"error": "dcr_application_already_bound"}
    # Once the bound session ended, the application may start again.
    r = await zone.http.delete(url(zone, sid(bound.json())), headers=dcr)
    assert r.status_code == 204, r.text
    r = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1"}, dcr)
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------------------------------------- capacity (28-30)


async def test_zone_capacity(zone: Zone):  # 28
    await bulk_sessions(zone, 49, "app-2")
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
    assert r.status_code == 201, r.text  # the 50th
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
    assert r.status_code == 429 and r.json() == {"error": "session_zone_limit_exceeded"}
    assert await session_count(zone) == 50


async def test_concurrent_starts_stop_at_the_zone_capacity(zone: Zone):
    """Starts racing for the last places: exactly the free places are taken. (Counts read by the
    statement that waited for the capacity lock missed the starts committed while it waited.)"""
    await bulk_sessions(zone, 40, "app-2")
    answers = await asyncio.gather(*(post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
                                     for _ in range(30)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 10 + [429] * 20, statuses
    assert await session_count(zone) == 50


async def test_application_capacity(zone: Zone, wide_stack):  # 29 (zone cap raised to 250)
    http = wide_stack.http
    await bulk_sessions(zone, 199, "app-1")
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"}, http=http)
    assert r.status_code == 201, r.text  # the 200th of app-1
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"}, http=http)
    assert r.status_code == 429 and r.json() == {"error": "session_limit_exceeded"}
    r = await post_start(zone, {"application_id": "app-2", "subject_session_id": "ar-1"}, zone.headers("app-2"),
                         http=http)
    assert r.status_code == 201, r.text  # other applications are not affected
    # Zone full as well: the zone cap is checked first.
    await bulk_sessions(zone, 49, "app-2")
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"}, http=http)
    assert r.status_code == 429 and r.json() == {"error": "session_zone_limit_exceeded"}


async def test_capacity_counts_only_capacity_live_sessions(zone: Zone):  # 30
    await bulk_sessions(zone, 47, "app-2")
    await bulk_sessions(zone, 5, "app-2", age_s=7200, ttl=3600)  # task past its TTL, not yet settled
    await bulk_sessions(zone, 3, "app-2", age_s=7200, ttl=None)  # NULL ttl counts as 3600
    await bulk_sessions(zone, 5, "app-2", lifecycle="service", ttl=None, deadline_in=-10)  # lapsed lease
    await bulk_sessions(zone, 3, "app-2", status="suspended", age_s=7200, ttl=3600)  # suspended task past TTL
    await bulk_sessions(zone, 3, "app-2", status="terminated")
    await bulk_sessions(zone, 3, "app-2", status="expired")
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
    assert r.status_code == 201, r.text  # 48 live
    await bulk_sessions(zone, 1, "app-2", lifecycle="service", status="suspended", ttl=None, deadline_in=-10)
    await bulk_sessions(zone, 1, "app-2", lifecycle="service", ttl=None, deadline_in=60)
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"})
    assert r.status_code == 429 and r.json() == {"error": "session_zone_limit_exceeded"}, r.text  # 50 live


# ---------------------------------------------------------------------------------------------- parents (31-37, 42, 43)


async def test_parent_must_be_active(zone: Zone):  # 31
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": "ghost"})
    assert r.status_code == 404 and r.json() == {"error": "parent_not_found"}
    parent = await zone.start()
    r = await zone.http.patch(url(zone, sid(parent), "suspend"), headers=zone.headers())
    assert r.status_code == 200
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(parent)})
    assert r.status_code == 404 and r.json() == {"error": "parent_not_found"}
    other = await seed_zone(zone.stack, zone.key)  # a parent in another zone is unknown here
    foreign = await other.start()
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(foreign)})
    assert r.status_code == 404 and r.json() == {"error": "parent_not_found"}
    assert await session_count(zone) == 1


async def test_parent_and_child_kinds(zone: Zone):  # 32, 33
    dcr_parent = await zone.start("dcr-app", headers=zone.headers("dcr-app"))
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(dcr_parent)},
                         zone.headers(scopes=["coordinator.spawn_under:dcr-app"]))
    assert r.status_code == 409 and r.json() == {"error": "dcr_application_cannot_start_child"}
    r = await post_start(zone, {"application_id": "dcr-app", "subject_session_id": "ar-1",
                                "parent_id": sid(dcr_parent)}, zone.headers("dcr-app"))
    assert r.status_code == 409 and r.json() == {"error": "dcr_application_cannot_be_child"}
    task = await zone.start()
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(task),
                                "lifecycle": "service"})
    assert r.status_code == 409 and r.json() == {"error": "task_session_cannot_start_service"}
    service = await zone.start(lifecycle="service")
    for lifecycle in ("service", "task"):
        child = await zone.start(parent_id=sid(service), lifecycle=lifecycle)
        assert child["depth"] == 1 and child["parent_id"] == sid(service)


async def test_parent_of_another_application(zone: Zone):  # 34
    parent = await zone.start("parent-app", headers=zone.headers("parent-app"))
    body = {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(parent)}
    r = await post_start(zone, body, zone.headers(scopes=["coordinator.admin"]))
    assert r.status_code == 403 and r.json() == {"error": "parent_ownership_required"}
    r = await post_start(zone, body, zone.headers(scopes=["coordinator.spawn_under:app-1"]))
    assert r.status_code == 403 and r.json() == {"error": "parent_ownership_required"}
    assert (await zone.session_row(sid(parent)))["child_count"] == 0
    r = await post_start(zone, body, zone.headers(scopes=["coordinator.spawn_under:parent-app"]))
    assert r.status_code == 201, r.text
    assert r.json()["application_id"] == "app-1" and r.json()["parent_id"] == sid(parent)


async def test_children_limit(zone: Zone):  # 35
    parent = await zone.start()
    await zone.stack.db.execute("UPDATE sessions SET child_count = 9 WHERE id = %s", (sid(parent),))
    await zone.start(parent_id=sid(parent))  # the 10th child
    assert (await zone.session_row(sid(parent)))["child_count"] == 10
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(parent)})
    assert r.status_code == 429 and r.json() == {"error": "session_children_limit_exceeded"}
    assert await session_count(zone) == 2


async def test_depth_limit(zone: Zone):  # 36
    deep = await zone.start()
    await zone.stack.db.execute("UPDATE sessions SET depth = 10 WHERE id = %s", (sid(deep),))
    r = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1", "parent_id": sid(deep)})
    assert r.status_code == 429 and r.json() == {"error": "session_depth_limit_exceeded"}
    nine = await zone.start()
    await zone.stack.db.execute("UPDATE sessions SET depth = 9 WHERE id = %s", (sid(nine),))
    child = await zone.start(parent_id=sid(nine))
    assert child["depth"] == 10 and (await zone.session_row(sid(child)))["depth"] == 10


async def test_child_start_topology_and_children_list(zone: Zone):  # 37, §4.7
    parent = await zone.start(labels=["p"])
    child = await zone.start(parent_id=sid(parent), labels=["c"])
    assert child["depth"] == 1 and child["parent_id"] == sid(parent) and child["delegation_edge_id"] is None
    assert await count(zone, "SELECT count(*) FROM agent_topology WHERE parent_id = %s AND child_id = %s",
                       sid(parent), sid(child)) == 1
    assert (await zone.session_row(sid(parent)))["child_count"] == 1
    row = await zone.session_row(sid(child))
    assert row["root_id"] == sid(parent) and row["parent_id"] == sid(parent)
    spawn = [e for e in await zone.events(AGENTS_LIFECYCLE) if e["dedupe_key"] == f"spawn:{sid(child)}"]
    assert spawn[0]["payload_json"]["parent_id"] == sid(parent)
    second = await zone.start(parent_id=sid(parent))
    assert (await zone.session_row(sid(parent)))["child_count"] == 2

    r = await zone.http.get(url(zone, sid(parent), "children") + "?limit=1", headers=zone.headers())
    assert r.status_code == 200, r.text
    page = r.json()
    assert [i["agent_session_id"] for i in page["items"]] == [sid(second)] and page["next_cursor"] == sid(second)
    assert "terminated_at" not in page["items"][0] and "termination_reason" not in page["items"][0]
    r = await zone.http.get(url(zone, sid(parent), "children") + f"?cursor={sid(second)}&status=expired",
                            headers=zone.headers())
    assert [i["agent_session_id"] for i in r.json()["items"]] == [sid(child)]  # filters are ignored
    r = await zone.http.delete(url(zone, sid(child)), headers=zone.headers())
    assert r.status_code == 204
    r = await zone.http.get(url(zone, sid(parent), "children"), headers=zone.headers())
    assert {i["agent_session_id"]: i["status"] for i in r.json()["items"]} == {
        sid(child): "terminated", sid(second): "active"}  # any status
    assert (await zone.session_row(sid(parent)))["child_count"] == 1
    r = await zone.http.get(url(zone, "ghost", "children"), headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


async def _inbound_edge(zone: Zone, target: str, receiver: str = "app-1") -> str:
    source = await zone.start("app-2", headers=zone.headers("app-2"))
    edge_id = f"edge-{uuid.uuid4().hex[:8]}"
    await zone.stack.db.execute("""
        INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
                                      receiver_application_id, resource_id, scopes, expires_at)
        VALUES (%s, %s, %s, %s, 'app-2', %s, 'res-1', '{read}', now() + interval '1 hour')""",
                                (edge_id, zone.id, sid(source), target, receiver))
    return edge_id


async def test_parent_authority_none_and_no_inbound_edges(zone: Zone):  # 42, 43
    plain = await zone.start()
    child = await zone.start(parent_id=sid(plain))  # 43: the parent never had inbound edges
    assert child["delegation_edge_id"] is None
    granted = await zone.start()
    await _inbound_edge(zone, sid(granted))
    edges_before = await count(zone, "SELECT count(*) FROM delegation_edges WHERE zone_id = %s", zone.id)
    child = await zone.start(parent_id=sid(granted), parent_authority="none")  # 42
    assert child["delegation_edge_id"] is None
    assert await count(zone, "SELECT count(*) FROM delegation_edges WHERE zone_id = %s", zone.id) == edges_before
    assert await keys(zone, DELEGATIONS_INVALIDATE) == []
    # The same parent with the default (inherit) does hand its edge down: "none" above meant something.
    inherited = await zone.start(parent_id=sid(granted))
    assert inherited["delegation_edge_id"] is not None


# ---------------------------------------------------------------------------------------------- idempotency (44-52)


def idem(zone: Zone, key: str, app: str = "app-1", **extra: str) -> dict[str, str]:
    return {**zone.headers(app), "Idempotency-Key": key, **extra}


async def test_idempotent_replay(zone: Zone):  # 44, 45
    body = {"application_id": "app-1", "subject_session_id": "ar-1", "labels": ["a"], "metadata": {"t": 1}}
    first = await post_start(zone, body, idem(zone, "k-44"))
    assert first.status_code == 201 and "idempotency-replayed" not in first.headers
    events_before = await zone.events()
    again = await post_start(zone, {**body, "labels": [" a "]}, idem(zone, "k-44"))  # same after trimming
    assert again.status_code == 201, again.text
    assert again.headers["idempotency-replayed"] == "true"
    assert again.json() == first.json()
    assert await session_count(zone) == 1
    assert await zone.events() == events_before
    assert await count(zone, "SELECT count(*) FROM coordinator_idempotency_receipts WHERE zone_id = %s", zone.id) == 1

    r = await post_start(zone, {**body, "metadata": {"t": 2}}, idem(zone, "k-44"))
    assert r.status_code == 409 and r.json()["error"] == "idempotency_key_conflict" and r.json()["message"]
    # The principal is (client_id, sub): other scopes replay, another caller conflicts.
    r = await post_start(zone, body, {**zone.headers(scopes=["x"]), "Idempotency-Key": "k-44"})
    assert r.status_code == 201 and r.headers["idempotency-replayed"] == "true"
    r = await post_start(zone, body, {**zone.headers("app-2", scopes=["coordinator.spawn_for:app-1"]),
                                      "Idempotency-Key": "k-44"})
    assert r.status_code == 409 and r.json()["error"] == "idempotency_key_conflict"
    assert await session_count(zone) == 1


async def test_replay_of_an_ended_session_is_inactive(zone: Zone):  # 46
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    first = (await post_start(zone, body, idem(zone, "k-46"))).json()
    r = await zone.http.delete(url(zone, sid(first)), headers=zone.headers())
    assert r.status_code == 204
    r = await post_start(zone, body, idem(zone, "k-46"))
    assert r.status_code == 409 and r.json()["error"] == "idempotency_result_inactive" and r.json()["message"]
    # TTL elapsed (not yet settled) is inactive as well.
    second = (await post_start(zone, body, idem(zone, "k-46b"))).json()
    await zone.stack.db.execute("UPDATE sessions SET started_at = now() - interval '2 hours' WHERE id = %s",
                                (sid(second),))
    r = await post_start(zone, body, idem(zone, "k-46b"))
    assert r.status_code == 409 and r.json()["error"] == "idempotency_result_inactive"
    assert await session_count(zone) == 2


async def test_idempotency_key_format(zone: Zone):  # 47
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    for key in (" key", "key ", "key\tvalue", "key\x7fvalue", "a" * 256, "", "é".encode() * 128):
        r = await post_start(zone, body, {**zone.headers(), "x-request-id": "rid-47", "Idempotency-Key": key})
        assert r.status_code == 400, (key, r.text)
        assert r.json()["error"] == "idempotency_key_invalid" and r.json()["request_id"] == "rid-47", key
        assert r.json()["message"]
    raw = zone.http.build_request("POST", url(zone), json=body, headers=zone.headers())
    raw.headers["Idempotency-Key"] = "key\nvalue"
    if "\n" in raw.headers["Idempotency-Key"]:
        r = await zone.http.send(raw)
        assert r.status_code == 400 and r.json()["error"] == "idempotency_key_invalid"
    headers = [*zone.headers().items(), ("Idempotency-Key", "one"), ("Idempotency-Key", "two")]
    r = await zone.http.post(url(zone), json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "idempotency_key_multiple" and r.json()["request_id"]
    assert await session_count(zone) == 0

    key = "ticket-queue:v1:PP-8412"
    assert (await post_start(zone, body, idem(zone, key))).status_code == 201
    assert (await post_start(zone, body, idem(zone, "a" * 255))).status_code == 201
    receipt = await zone.stack.db.fetchrow(
        "SELECT * FROM coordinator_idempotency_receipts WHERE zone_id = %s AND key_digest = %s",
        (zone.id, key_digest(key, zone.stack.settings.idempotency_key_bytes)))
    assert receipt is not None  # the key verbatim, no normalisation
    assert receipt["operation"] == "session.start.v2" and receipt["scope_id"] == "app-1"
    assert receipt["resource_type"] == "session" and receipt["response_status"] == 201


async def test_same_key_other_application_is_independent(zone: Zone):  # 48
    a = await post_start(zone, {"application_id": "app-1", "subject_session_id": "ar-1"}, idem(zone, "shared"))
    b = await post_start(zone, {"application_id": "app-2", "subject_session_id": "ar-1"}, idem(zone, "shared", "app-2"))
    assert a.status_code == b.status_code == 201
    assert "idempotency-replayed" not in b.headers and sid(a.json()) != sid(b.json())
    scopes = await zone.stack.db.fetch(
        "SELECT scope_id FROM coordinator_idempotency_receipts WHERE zone_id = %s ORDER BY scope_id", (zone.id,))
    assert [r["scope_id"] for r in scopes] == ["app-1", "app-2"]


async def test_receipt_quota(zone: Zone):  # 49
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    first = await post_start(zone, body, idem(zone, "k-kept"))
    assert first.status_code == 201
    await zone.stack.db.execute("""
        INSERT INTO coordinator_idempotency_receipts (id, operation, zone_id, scope_id, key_digest, request_digest,
            resource_type, resource_id, response_status, response_json, expires_at)
        SELECT gen_random_uuid()::text, 'session.start.v2', %s, 'app-1', sha256(('k' || g)::bytea),
               sha256('r'::bytea), 'session', 'x', 201, '{}', now() + interval '1 day'
        FROM generate_series(1, 9999) g""", (zone.id,))
    r = await post_start(zone, body, idem(zone, "k-new"))
    assert r.status_code == 429 and r.json() == {"error": "idempotency_receipt_limit_exceeded"}
    # A known key still replays; no key, or another scope, is not limited.
    r = await post_start(zone, body, idem(zone, "k-kept"))
    assert r.status_code == 201 and r.headers["idempotency-replayed"] == "true"
    assert (await post_start(zone, body)).status_code == 201
    r = await post_start(zone, {"application_id": "app-2", "subject_session_id": "ar-1"}, idem(zone, "k-new", "app-2"))
    assert r.status_code == 201
    # Expired receipts do not count.
    await zone.stack.db.execute("""UPDATE coordinator_idempotency_receipts SET created_at = now() - interval '2 days',
                                   expires_at = now() - interval '1 day'
                                   WHERE id IN (SELECT id FROM coordinator_idempotency_receipts
                                                WHERE zone_id = %s AND resource_id = 'x' LIMIT 1)""", (zone.id,))
    assert (await post_start(zone, body, idem(zone, "k-new"))).status_code == 201


async def test_receipt_retention(zone: Zone):  # 50, 51
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    await post_start(zone, body, idem(zone, "k-generated", **{"Idempotency-Key-Kind": "generated"}))
    await post_start(zone, body, idem(zone, "k-plain"))
    rows = {bytes(r["key_digest"]): r for r in await zone.stack.db.fetch(
        "SELECT key_digest, created_at, expires_at FROM coordinator_idempotency_receipts WHERE zone_id = %s",
        (zone.id,))}
    hkey = zone.stack.settings.idempotency_key_bytes
    generated, plain = rows[key_digest("k-generated", hkey)], rows[key_digest("k-plain", hkey)]
    assert (generated["expires_at"] - generated["created_at"]).total_seconds() == 86400
    assert (plain["expires_at"] - plain["created_at"]).total_seconds() == 604800
    assert close_to(plain["expires_at"], now() + timedelta(seconds=604800))

    # 51: an expired receipt is dropped and the request runs as new.
    first_id = (await zone.stack.db.fetchrow(
        "SELECT resource_id FROM coordinator_idempotency_receipts WHERE key_digest = %s", (key_digest("k-plain", hkey),)
    ))["resource_id"]
    await zone.stack.db.execute("""UPDATE coordinator_idempotency_receipts SET created_at = now() - interval '8 days',
                                   expires_at = now() - interval '1 day' WHERE key_digest = %s""",
                                (key_digest("k-plain", hkey),))
    r = await post_start(zone, body, idem(zone, "k-plain"))
    assert r.status_code == 201 and "idempotency-replayed" not in r.headers
    assert sid(r.json()) != first_id
    fresh = await zone.stack.db.fetch("SELECT resource_id, expires_at FROM coordinator_idempotency_receipts "
                                      "WHERE key_digest = %s", (key_digest("k-plain", hkey),))
    assert [f["resource_id"] for f in fresh] == [sid(r.json())] and fresh[0]["expires_at"] > now()


async def test_key_digest_and_rotation(zone: Zone, wide_stack):  # 52
    key = "rotate-me-52"
    body = {"application_id": "app-1", "subject_session_id": "ar-1"}
    first = await post_start(zone, body, idem(zone, key))  # main stack: the development key
    receipt = await zone.stack.db.fetchrow("SELECT key_digest, request_digest FROM coordinator_idempotency_receipts "
                                           "WHERE zone_id = %s", (zone.id,))
    digest = bytes(receipt["key_digest"])
    old_key = bytes.fromhex(DEV_IDEMPOTENCY_HMAC_KEY)
    assert len(digest) == 32 and len(bytes(receipt["request_digest"])) == 32
    assert digest == hmac.new(old_key, b"caracal:coordinator:idempotency:v1\x00" + key.encode(),
                              hashlib.sha256).digest()
    assert digest != key_digest(key, bytes.fromhex(ROTATED_HMAC_KEY))
    assert key.encode() not in digest
    # After rotation (new key current, old key previous) the receipt still replays.
    r = await post_start(zone, body, idem(zone, key), http=wide_stack.http)
    assert r.status_code == 201 and r.headers["idempotency-replayed"] == "true"
    assert r.json() == first.json()
    r = await post_start(zone, {**body, "labels": ["changed"]}, idem(zone, key), http=wide_stack.http)
    assert r.status_code == 409 and r.json()["error"] == "idempotency_key_conflict"
    # New receipts are written with the current key.
    r = await post_start(zone, body, idem(zone, "after-rotation"), http=wide_stack.http)
    assert r.status_code == 201
    assert await count(zone, "SELECT count(*) FROM coordinator_idempotency_receipts WHERE key_digest = %s",
                       key_digest("after-rotation", bytes.fromhex(ROTATED_HMAC_KEY))) == 1
    assert await session_count(zone) == 2


async def test_concurrent_identical_key_starts_create_one_session(zone: Zone):
    body = {"application_id": "app-1", "subject_session_id": "ar-1", "metadata": {"n": 5}}
    answers = await asyncio.gather(*(post_start(zone, body, idem(zone, "k-race")) for _ in range(5)))
    assert [a.status_code for a in answers] == [201] * 5, [a.text for a in answers]
    assert len({sid(a.json()) for a in answers}) == 1
    assert sum(a.headers.get("idempotency-replayed") == "true" for a in answers) == 4
    assert await session_count(zone) == 1
    assert await keys(zone, AGENTS_LIFECYCLE) == [f"spawn:{sid(answers[0].json())}"]
    assert await count(zone, "SELECT count(*) FROM coordinator_idempotency_receipts WHERE zone_id = %s", zone.id) == 1


# ------------------------------------------------------------------------------------------ suspend / resume (53-55)


async def test_suspend_subtree(zone: Zone):  # 53
    root = await zone.start()
    child = await zone.start(parent_id=sid(root))
    grandchild = await zone.start(parent_id=sid(child), subject_session_id="ar-app")  # exempt: application record
    ids = [sid(root), sid(child), sid(grandchild)]
    r = await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"suspended": 3}, r.text
    for i in ids:
        row = await zone.session_row(i)
        assert row["status"] == "suspended" and row["terminated_at"] is None and row["termination_reason"] is None
    lifecycle = [e for e in await zone.events(AGENTS_LIFECYCLE) if e["payload_json"]["event"] == "suspend"]
    versions = {i: (await zone.session_row(i))["state_version"] for i in ids}
    assert sorted(e["dedupe_key"] for e in lifecycle) == sorted(f"suspend:{i}:{versions[i]}" for i in ids)
    parents = {sid(root): None, sid(child): sid(root), sid(grandchild): sid(child)}
    for e in lifecycle:
        p = e["payload_json"]
        assert p == {"event": "suspend", "zone_id": zone.id, "agent_session_id": p["agent_session_id"],
                     "parent_id": parents[p["agent_session_id"]], "reason": "requested"}
    revoke = await zone.events(SESSIONS_REVOKE)
    assert sorted(e["dedupe_key"] for e in revoke) == sorted(
        f"agent_suspend:{i}:{versions[i]}" for i in (sid(root), sid(child)))
    for e in revoke:
        assert e["payload_json"] == {"zone_id": zone.id, "session_id": "ar-1",
                                     "agent_session_id": e["payload_json"]["agent_session_id"], "reason": "requested"}
    await workflows_reach(zone, ids, "suspended")


async def test_suspend_errors_and_authorization(zone: Zone):  # 54
    s = await zone.start()
    r = await zone.http.patch(url(zone, sid(s), "suspend"), headers=zone.headers("app-2", "ar-2"))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    r = await zone.http.patch(url(zone, sid(s), "resume"), headers=zone.headers("app-2", "ar-2"))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    r = await zone.http.delete(url(zone, sid(s)), headers=zone.headers("app-2", "ar-2"))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    assert (await zone.session_row(sid(s)))["status"] == "active"
    r = await zone.http.patch(url(zone, "ghost", "suspend"), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    r = await zone.http.patch(url(zone, "ghost", "resume"), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    # coordinator.admin and spawn_for are enough to manage another application's session.
    r = await zone.http.patch(url(zone, sid(s), "suspend"), headers=zone.headers("app-2", "ar-2",
                                                                                 ["coordinator.admin"]))
    assert r.status_code == 200 and r.json() == {"suspended": 1}
    r = await zone.http.patch(url(zone, sid(s), "suspend"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_active"}
    r = await zone.http.patch(url(zone, sid(s), "resume"), headers=zone.headers("app-2", "ar-2",
                                                                                ["coordinator.spawn_for:app-1"]))
    assert r.status_code == 200 and r.json() == {"resumed": 1}
    r = await zone.http.delete(url(zone, sid(s)), headers=zone.headers())
    assert r.status_code == 204
    r = await zone.http.patch(url(zone, sid(s), "suspend"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_active"}
    r = await zone.http.patch(url(zone, sid(s), "resume"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_suspended"}


async def test_resume_service_subtree(zone: Zone):  # 55
    root = await zone.start(lifecycle="service")
    child = await zone.start(lifecycle="service", parent_id=sid(root))
    task = await zone.start(parent_id=sid(root))
    ids = [sid(root), sid(child), sid(task)]
    r = await zone.http.patch(url(zone, sid(root), "resume"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_suspended"}
    r = await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())
    assert r.json() == {"suspended": 3}
    await zone.stack.db.execute("UPDATE sessions SET heartbeat_deadline_at = now() + interval '5 seconds' "
                                "WHERE id = ANY(%s) AND lifecycle = 'service'", (ids,))
    r = await zone.http.patch(url(zone, sid(root), "resume"), headers=zone.headers())
    assert r.status_code == 200 and r.json() == {"resumed": 3}, r.text
    for i in ids:
        row = await zone.session_row(i)
        assert row["status"] == "active"
        if row["lifecycle"] == "service":
            assert close_to(row["heartbeat_deadline_at"], now() + timedelta(seconds=120))
        else:
            assert row["heartbeat_deadline_at"] is None
    r = await zone.http.get(url(zone, sid(root)), headers=zone.headers())
    assert close_to(ts(r.json()["heartbeat_deadline_at"]), now() + timedelta(seconds=120))
    resumes = [e for e in await zone.events(AGENTS_LIFECYCLE) if e["payload_json"]["event"] == "resume"]
    versions = {i: (await zone.session_row(i))["state_version"] for i in ids}
    assert sorted(e["dedupe_key"] for e in resumes) == sorted(f"resume:{i}:{versions[i]}" for i in ids)
    parents = {sid(root): None, sid(child): sid(root), sid(task): sid(root)}
    for e in resumes:
        p = e["payload_json"]
        assert p == {"event": "resume", "zone_id": zone.id, "agent_session_id": p["agent_session_id"],
                     "parent_id": parents[p["agent_session_id"]]}
    await workflows_reach(zone, ids, "active")
    r = await zone.http.patch(url(zone, sid(root), "resume"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_suspended"}

    # Per-transition keys (DESIGN): a second cycle emits its events again.
    for action in ("suspend", "resume"):
        r = await zone.http.patch(url(zone, sid(root), action), headers=zone.headers())
        assert r.status_code == 200, r.text
    lifecycle = await zone.events(AGENTS_LIFECYCLE)
    assert sum(e["payload_json"]["event"] == "suspend" for e in lifecycle) == 6
    assert sum(e["payload_json"]["event"] == "resume" for e in lifecycle) == 6
    assert len(await zone.events(SESSIONS_REVOKE)) == 6


async def test_resume_stops_at_non_suspended_nodes(zone: Zone):
    root = await zone.start()
    child = await zone.start(parent_id=sid(root))
    grandchild = await zone.start(parent_id=sid(child))
    # Suspend the child first, then the root: the root's suspend stops at the suspended child.
    assert (await zone.http.patch(url(zone, sid(child), "suspend"), headers=zone.headers())).json() == {"suspended": 2}
    assert (await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())).json() == {"suspended": 1}
    # Resume the grandchild alone: the parent's status is not checked.
    resumed = await zone.http.patch(url(zone, sid(grandchild), "resume"), headers=zone.headers())
    assert resumed.json() == {"resumed": 1}
    # Resume of the root includes the suspended child but not the (active) grandchild.
    assert (await zone.http.patch(url(zone, sid(root), "resume"), headers=zone.headers())).json() == {"resumed": 2}
    await workflows_reach(zone, [sid(root), sid(child), sid(grandchild)], "active")


async def test_suspend_and_resume_reach_every_workflow_of_a_three_level_tree(zone: Zone):
    root = await zone.start()
    children = await asyncio.gather(*(zone.start(parent_id=sid(root)) for _ in range(2)))
    grandchildren = await asyncio.gather(*(zone.start(parent_id=sid(c)) for c in children for _ in range(2)))
    ids = [sid(root), *map(sid, children), *map(sid, grandchildren)]
    r = await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())
    assert r.json() == {"suspended": 7}
    await workflows_reach(zone, ids, "suspended")
    assert await count(zone, "SELECT count(*) FROM sessions WHERE id = ANY(%s) AND status = 'suspended'", ids) == 7
    # Every workflow knows: a descendant refuses a second suspend in its own validator.
    r = await zone.http.patch(url(zone, sid(grandchildren[0]), "suspend"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_active"}
    r = await zone.http.patch(url(zone, sid(root), "resume"), headers=zone.headers())
    assert r.json() == {"resumed": 7}
    await workflows_reach(zone, ids, "active")
    r = await zone.http.patch(url(zone, sid(children[1]), "resume"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_suspended"}
    r = await zone.http.patch(url(zone, sid(children[1]), "suspend"), headers=zone.headers())
    assert r.json() == {"suspended": 3}


# ---------------------------------------------------------------------------------------------- terminate (56-59)


async def test_terminate_cascade(zone: Zone):  # 56
    top = await zone.start(subject_session_id="ar-app")
    root = await zone.start(parent_id=sid(top))
    child = await zone.start(parent_id=sid(root), subject_session_id="ar-2")
    assert (await zone.session_row(sid(top)))["child_count"] == 1
    r = await zone.http.delete(url(zone, sid(root)), headers=zone.headers())
    assert r.status_code == 204 and r.content == b""
    root_row, child_row = await zone.session_row(sid(root)), await zone.session_row(sid(child))
    assert (root_row["status"], root_row["termination_reason"]) == ("terminated", "requested")
    assert (child_row["status"], child_row["termination_reason"]) == ("terminated", "parent_terminated")
    assert root_row["terminated_at"] is not None and child_row["terminated_at"] is not None
    top_row = await zone.session_row(sid(top))
    assert top_row["child_count"] == 0 and top_row["status"] == "active"

    rows = await zone.stack.db.fetch("""SELECT topic, dedupe_key, payload_json, created_at FROM caracal_outbox
                                        WHERE zone_id = %s AND dedupe_key LIKE '%%terminate:%%' ORDER BY seq""",
                                     (zone.id,))
    assert sorted(r["dedupe_key"] for r in rows) == sorted([
        f"terminate:{sid(root)}", f"terminate:{sid(child)}",
        f"agent_terminate:{sid(root)}", f"agent_terminate:{sid(child)}"])
    assert len({r["created_at"] for r in rows}) == 1  # one transaction
    by_key = {r["dedupe_key"]: r["payload_json"] for r in rows}
    assert by_key[f"terminate:{sid(root)}"] == {"event": "terminate", "zone_id": zone.id,
                                               "agent_session_id": sid(root), "parent_id": sid(top),
                                               "reason": "requested"}
    assert by_key[f"terminate:{sid(child)}"]["reason"] == "requested"  # descendants carry R
    assert by_key[f"agent_terminate:{sid(root)}"] == {"zone_id": zone.id, "session_id": "ar-1",
                                                     "agent_session_id": sid(root), "reason": "requested"}
    assert by_key[f"agent_terminate:{sid(child)}"]["session_id"] == "ar-2"
    for i in (sid(root), sid(child)):
        await eventually(lambda i=i: _completed(zone, i))
    assert await zone.workflow_status(sid(top)) == "active"
    r = await zone.http.get(url(zone, sid(root)), headers=zone.headers())
    body = r.json()
    assert body["status"] == "terminated" and body["termination_reason"] == "requested" and body["terminated_at"]


async def _completed(zone: Zone, session_id: str) -> bool:
    return await describe_status(zone, session_id) == WorkflowExecutionStatus.COMPLETED


async def test_revocation_exemptions(zone: Zone):  # 57
    root = await zone.start()
    child = await zone.start(parent_id=sid(root), subject_session_id="ar-2")
    await zone.start()  # another live session on ar-1, outside the subtree
    assert (await zone.http.delete(url(zone, sid(root)), headers=zone.headers())).status_code == 204
    revoke = await keys(zone, SESSIONS_REVOKE)
    assert revoke == [f"agent_terminate:{sid(child)}"]
    assert set(await keys(zone, AGENTS_LIFECYCLE)) >= {f"terminate:{sid(root)}", f"terminate:{sid(child)}"}
    app_record = await zone.start(subject_session_id="ar-app")
    assert (await zone.http.patch(url(zone, sid(app_record), "suspend"), headers=zone.headers())).status_code == 200
    assert (await zone.http.delete(url(zone, sid(app_record)), headers=zone.headers())).status_code == 204
    assert await keys(zone, SESSIONS_REVOKE) == [f"agent_terminate:{sid(child)}"]


async def test_terminate_revokes_touching_edges(zone: Zone):  # 58
    a, b, c = await zone.start(), await zone.start(), await zone.start()
    edges = {}
    for name, source, target in (("e1", a, b), ("e2", c, a), ("e3", b, c)):
        edges[name] = f"{name}-{uuid.uuid4().hex[:6]}"
        await zone.stack.db.execute("""
            INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
                                          receiver_application_id, scopes, expires_at)
            VALUES (%s, %s, %s, %s, 'app-1', 'app-1', '{read}', now() + interval '1 hour')""",
                                    (edges[name], zone.id, sid(source), sid(target)))
    await zone.stack.db.execute("INSERT INTO delegation_graph_epochs (zone_id, epoch) VALUES (%s, 4)", (zone.id,))
    r = await zone.http.delete(url(zone, sid(a)) + "?reason=cleanup", headers=zone.headers())
    assert r.status_code == 204
    rows = {r["id"]: r for r in await zone.stack.db.fetch(
        "SELECT id, status, edge_version, revoked_at FROM delegation_edges WHERE zone_id = %s", (zone.id,))}
    for name in ("e1", "e2"):
        assert rows[edges[name]]["status"] == "revoked" and rows[edges[name]]["edge_version"] == 1
        assert rows[edges[name]]["revoked_at"] is not None
    assert rows[edges["e3"]]["status"] == "active" and rows[edges["e3"]]["edge_version"] == 0
    assert await zone.stack.db.fetchval("SELECT epoch FROM delegation_graph_epochs WHERE zone_id = %s",
                                        (zone.id,)) == 5
    invalidate = await zone.events(DELEGATIONS_INVALIDATE)
    assert sorted(e["dedupe_key"] for e in invalidate) == sorted(f"edge_revoke:{edges[n]}" for n in ("e1", "e2"))
    for e in invalidate:
        assert e["payload_json"] == {"event": "edge_revoke", "zone_id": zone.id,
                                     "edge_id": e["payload_json"]["edge_id"], "reason": "cleanup", "epoch": 5}
    row = await zone.session_row(sid(a))
    assert row["termination_reason"] == "cleanup"
    assert (await zone.session_row(sid(b)))["status"] == "active"  # endpoints are not chased


async def test_delete_validation_and_repeat(zone: Zone):  # 59
    s = await zone.start()
    for q in ("reason=", "reason=" + "r" * 257):
        r = await zone.http.delete(url(zone, sid(s)) + "?" + q, headers=zone.headers())
        assert r.status_code == 400 and r.json()["error"] == "invalid_query", r.text
    assert (await zone.session_row(sid(s)))["status"] == "active"
    r = await zone.http.delete(url(zone, sid(s)) + "?reason=" + "r" * 256, headers=zone.headers())
    assert r.status_code == 204
    assert (await zone.session_row(sid(s)))["termination_reason"] == "r" * 256
    r = await zone.http.delete(url(zone, sid(s)), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    r = await zone.http.delete(url(zone, "ghost"), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    # Suspended sessions can be terminated; operators may terminate any session.
    t = await zone.start()
    assert (await zone.http.patch(url(zone, sid(t), "suspend"), headers=zone.headers())).status_code == 200
    r = await zone.http.delete(url(zone, sid(t)), headers=zone.operator_headers)
    assert r.status_code == 204, r.text
    assert (await zone.session_row(sid(t)))["status"] == "terminated"
    assert len([k for k in await keys(zone, AGENTS_LIFECYCLE) if k.startswith("terminate:")]) == 2


async def test_delete_service_session_is_fenced_by_lease_generation(zone: Zone):  # sdk-wire-contract §4.5
    s = await zone.start(lifecycle="service")
    assert s["lease_generation"] == 1
    r = await zone.http.delete(url(zone, sid(s)), headers=zone.headers())
    assert r.status_code == 400 and r.json() == {"error": "lease_generation_required"}
    r = await zone.http.request("DELETE", url(zone, sid(s)), json={"lease_generation": 2}, headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_lease_fenced"}
    r = await zone.http.request("DELETE", url(zone, sid(s)), json={"lease_generation": "1"}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    assert (await zone.session_row(sid(s)))["status"] == "active"
    r = await zone.http.request("DELETE", url(zone, sid(s)), json={"lease_generation": 1}, headers=zone.headers())
    assert r.status_code == 204, r.text
    other = await zone.start(lifecycle="service")
    r = await zone.http.delete(url(zone, sid(other)), headers=zone.headers("app-2", "ar-2", ["coordinator.admin"]))
    assert r.status_code == 204, r.text  # admins need no generation


async def test_command_racing_a_cascade_never_answers_503(zone: Zone):
    answers = []
    for _ in range(12):
        root = await zone.start()
        child = await zone.start(parent_id=sid(root))
        deleted, suspended = await asyncio.gather(
            zone.http.delete(url(zone, sid(root)), headers=zone.headers()),
            zone.http.patch(url(zone, sid(child), "suspend"), headers=zone.headers()))
        assert deleted.status_code == 204
        answers.append((suspended.status_code, suspended.json()))
    for status, body in answers:
        assert (status, body) in ((200, {"suspended": 1}), (409, {"error": "session_not_found_or_not_active"})), answers


async def test_delete_subtree_of_twenty_descendants(zone: Zone):
    root = await zone.start()
    children = await asyncio.gather(*(zone.start(parent_id=sid(root)) for _ in range(4)))
    grandchildren = await asyncio.gather(*(zone.start(parent_id=sid(c)) for c in children for _ in range(4)))
    descendants = [*map(sid, children), *map(sid, grandchildren)]
    assert len(descendants) == 20
    # One grandchild suspended beforehand: still collected.
    assert (await zone.http.patch(url(zone, descendants[-1], "suspend"), headers=zone.headers())).status_code == 200
    r = await zone.http.delete(url(zone, sid(root)), headers=zone.headers())
    assert r.status_code == 204, r.text
    rows = await zone.stack.db.fetch("SELECT id, status, termination_reason, terminated_at FROM sessions "
                                     "WHERE zone_id = %s", (zone.id,))
    assert len(rows) == 21
    for row in rows:
        expected = ("terminated", "requested" if row["id"] == sid(root) else "parent_terminated")
        assert (row["status"], row["termination_reason"]) == expected and row["terminated_at"] is not None
    assert len([k for k in await keys(zone, AGENTS_LIFECYCLE) if k.startswith("terminate:")]) == 21
    assert len(await keys(zone, SESSIONS_REVOKE)) == 21

    async def all_done() -> bool:
        states = await asyncio.gather(*(describe_status(zone, i) for i in [sid(root), *descendants]))
        return all(s == WorkflowExecutionStatus.COMPLETED for s in states)
    await eventually(all_done, timeout=10)
    r = await zone.http.delete(url(zone, descendants[0]), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}


# ---------------------------------------------------------------------------------------------- TTL expiry (DESIGN)


async def test_ttl_expiry_settles_within_two_seconds_with_its_cascade(zone: Zone):
    root = await zone.start(ttl_seconds=2)
    child = await zone.start(parent_id=sid(root))
    deadline = ts(root["started_at"]) + timedelta(seconds=2)

    async def settled() -> bool:
        r, c = await zone.session_row(sid(root)), await zone.session_row(sid(child))
        return (r["status"], r["termination_reason"], c["status"], c["termination_reason"]) == (
            "expired", "ttl", "terminated", "parent_terminated")

    async def both_completed() -> bool:
        return await _completed(zone, sid(root)) and await _completed(zone, sid(child))

    await eventually(settled, timeout=4.5)
    await eventually(both_completed, timeout=4.5)
    assert now() <= deadline + timedelta(seconds=2), now() - deadline
    root_row = await zone.session_row(sid(root))
    assert root_row["terminated_at"] >= deadline - timedelta(milliseconds=5)
    events = await keys(zone)
    for key in (f"terminate:{sid(root)}", f"terminate:{sid(child)}",
                f"agent_terminate:{sid(root)}", f"agent_terminate:{sid(child)}"):
        assert key in events
    payloads = {e["dedupe_key"]: e["payload_json"] for e in await zone.events(AGENTS_LIFECYCLE)}
    assert payloads[f"terminate:{sid(root)}"]["reason"] == "ttl"
    assert payloads[f"terminate:{sid(child)}"]["reason"] == "ttl"
    r = await zone.http.get(url(zone, sid(root)), headers=zone.headers())
    assert r.json()["status"] == "expired" and r.json()["termination_reason"] == "ttl"
    r = await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())
    assert r.status_code == 409 and r.json() == {"error": "session_not_found_or_not_active"}
    r = await zone.http.delete(url(zone, sid(child)), headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}


async def test_live_counts_follow_every_writer(zone: Zone):
    """session_capacity (the upper bound that spares a start the zone count) follows starts, ends
    and any other writer of `sessions`, cascades included."""
    async def live() -> dict[str, int]:
        rows = await zone.stack.db.fetch("SELECT application_id, live FROM session_capacity WHERE zone_id = %s",
                                         (zone.id,))
        return {r["application_id"]: r["live"] for r in rows if r["live"]}
    root = await zone.start()
    await zone.start(parent_id=sid(root))
    other = await zone.start()
    assert await live() == {"app-1": 3}
    assert (await zone.http.patch(url(zone, sid(root), "suspend"), headers=zone.headers())).status_code == 200
    assert await live() == {"app-1": 3}  # suspended sessions still count
    assert (await zone.http.delete(url(zone, sid(root)), headers=zone.headers())).status_code == 204
    assert await live() == {"app-1": 1}
    await bulk_sessions(zone, 4, "app-2")  # written by plain SQL
    assert await live() == {"app-1": 1, "app-2": 4}
    await zone.stack.db.execute("DELETE FROM sessions WHERE id = %s", (sid(other),))
    assert await live() == {"app-2": 4}


async def test_the_reconciler_starts_no_workflow_for_a_session_whose_notice_waits_in_a_fanout(zone: Zone):
    """A session named in a cascade's fan-out row not yet spread has a notice on its way: the
    reconciler leaves it alone, and gives a `sync` notice to a live session with none."""
    await bulk_sessions(zone, 2)
    waiting, missing = sorted(r["id"] for r in await zone.stack.db.fetch(
        "SELECT id FROM sessions WHERE zone_id = %s AND id LIKE 'bulk-%%'", (zone.id,)))
    workflow_ids = [wc.session_workflow_id(zone.id, s) for s in (waiting, missing)]
    # A plain connection with its own BEGIN: the notices are written at once, and all of it is rolled
    # back (the stack's dispatcher sees nothing of it).
    async with zone.stack.db.connection() as conn:
        await conn.execute("BEGIN")
        try:
            await conn.execute(f"""
                WITH changed AS (SELECT {SNAPSHOT_COLUMNS} FROM sessions s
                                 WHERE s.zone_id = %(zone)s AND s.id = %(id)s),
                     written AS ({fanout_sql("changed", "c.id")})
                SELECT count(*) FROM written""",
                               {"zone": zone.id, "id": waiting, "signal": wc.SESSION_SUSPENDED, "summary": "cascade",
                                "reason": "requested"})
            # Narrowed to the two: the shared database holds other tests' live sessions, more than a limit.
            await start_missing(conn, await missing_candidates(conn, set(), set(), grace_seconds=0, limit=1000,
                                                               only_workflow_ids=workflow_ids))
            cur = await conn.execute("SELECT workflow_id, signal FROM workflow_outbox WHERE workflow_id = ANY(%s)",
                                     (workflow_ids,))
            written = [(r["workflow_id"], r["signal"]) for r in await cur.fetchall()]
        finally:
            await conn.execute("ROLLBACK")
    assert written == [(workflow_ids[1], wc.SESSION_SYNC)]


async def test_a_subtree_suspend_of_a_fresh_tree_updates_every_row_in_place(zone: Zone):
    """A cascade changes every row of the pages its tree was written to. Each new version must fit
    on its row's page (a HOT update: no entry in any of the table's indexes), so the table keeps
    half of every page free (migration 0009). Counted inside the suspend's own transaction, which
    is rolled back."""
    from storage.sessions import suspend_subtree

    root = sid(await zone.start())
    # Forty children written one after another, as the API writes them (by SQL: no rate limit).
    for _ in range(40):
        await zone.stack.db.execute("""
            INSERT INTO sessions (id, zone_id, application_id, parent_id, root_id, depth, subject_authority_record_id,
                                  status, lifecycle, started_at, ttl_seconds, metadata_json)
            VALUES ('child-' || gen_random_uuid()::text, %(zone)s, 'app-1', %(root)s, %(root)s, 1, 'ar-1', 'active',
                    'task', now(), 3600, '{"purpose": "a child of a fresh tree"}')""", {"zone": zone.id, "root": root})
    async with zone.stack.db.connection() as conn:
        await conn.execute("BEGIN")
        try:
            counted = """SELECT pg_stat_get_xact_tuples_updated('sessions'::regclass) AS updated,
                                pg_stat_get_xact_tuples_hot_updated('sessions'::regclass) AS hot"""
            before = await (await conn.execute(counted)).fetchone()
            suspended = await suspend_subtree(conn, zone.id, [root], "requested")
            after = await (await conn.execute(counted)).fetchone()
        finally:
            await conn.execute("ROLLBACK")
    updated, hot = after["updated"] - before["updated"], after["hot"] - before["hot"]
    assert suspended == 41 and updated == 41
    assert hot == updated, (hot, updated)
