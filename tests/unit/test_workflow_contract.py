"""The notices storage/ writes as JSON are exactly the payloads the workflows decode."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from temporalio.converter import DataConverter

from rules import workflow_contract as wc
from storage.notices import invocation_notice, session_notice
from workflows.models import InvocationNotice, InvocationSnapshot, SessionNotice, SessionSnapshot

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def session_row(**over):
    row = {"id": "s1", "zone_id": "z", "application_id": "app-1", "lifecycle": "task", "status": "suspended",
           "state_version": 3, "parent_id": "p1", "root_id": "r1", "started_at": T0, "ttl_seconds": 60,
           "heartbeat_deadline_at": None, "lease_generation": 0, "termination_reason": None}
    return {**row, **over}


async def roundtrip(value, type_hint):
    converter = DataConverter.default
    payloads = await converter.encode([value])
    return (await converter.decode(payloads, [type_hint]))[0]


async def test_session_notice_decodes_into_the_workflow_payload():
    notice = session_notice(session_row(), wc.SESSION_SUSPENDED, "suspended with the subtree of r1 (requested)",
                            reason="requested")
    decoded = await roundtrip(notice.payload, SessionNotice)
    assert isinstance(decoded, SessionNotice) and isinstance(decoded.session, SessionSnapshot)
    assert decoded.session.status == "suspended" and decoded.session.state_version == 3
    assert decoded.session.reason == "requested"
    assert decoded.session.expires_at == (T0 + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert notice.workflow_id == "session/z/s1" and notice.workflow_type == wc.SESSION_WORKFLOW
    assert notice.start_args == {"zone_id": "z", "session_id": "s1"}
    assert notice.search_attributes[wc.SA_SESSION_STATUS] == "suspended"
    assert notice.search_attributes[wc.SA_PARENT] == "p1" and notice.search_attributes[wc.SA_ROOT] == "r1"
    assert set(notice.search_attributes) <= set(wc.SEARCH_ATTRIBUTES)


async def test_ended_session_carries_its_termination_reason():
    notice = session_notice(session_row(status="expired", termination_reason="ttl"), wc.SESSION_TERMINATED, "x",
                            reason="ignored")
    assert (await roundtrip(notice.payload, SessionNotice)).session.reason == "ttl"


async def test_invocation_notice_decodes_into_the_workflow_payload():
    row = {"id": "i1", "zone_id": "z", "service_id": "svc", "method": "run", "status": "running", "attempts": 1,
           "max_attempts": 3, "state_version": 2, "deadline_at": T0, "source_session_id": None}
    notice = invocation_notice(row, wc.INVOCATION_STARTED, "attempt 1/3 started")
    decoded = await roundtrip(notice.payload, InvocationNotice)
    assert isinstance(decoded.invocation, InvocationSnapshot)
    assert decoded.invocation.deadline_at == "2026-11-30T12:00:00.000Z" and decoded.invocation.attempts == 1
    assert wc.SA_SESSION not in notice.search_attributes
    assert set(notice.search_attributes) <= set(wc.SEARCH_ATTRIBUTES)
