"""The v1 façade and /v1/verify (reference §4.24-4.25; §13 cases 110-115)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from api.routes.v1 import ExchangeBody
from devstack.tokens import mint_token
from tests.conftest import ISSUER, Zone


def _expires(minutes: int = 10) -> str:
    return (datetime.now(timezone.utc) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _begin(zone: Zone, **extra) -> dict:
    return {"zone_id": zone.id, "application_id": "app-1", "subject_session_id": "ar-1", **extra}


def _skip_without_route(r) -> None:
    if r.status_code in (404, 405) and r.json().get("error") in ("not_found", "method_not_allowed"):
        pytest.skip("the delegation zone routes are not there yet")


async def test_begin_returns_the_inner_create_and_propagates_replays(zone: Zone):
    headers = zone.headers(**{"Idempotency-Key": f"k-{uuid.uuid4().hex}", "x-request-id": f"req-v1-begin-1-{zone.id}"})
    r = await zone.http.post("/v1/begin", json=_begin(zone, labels=["a"]), headers=headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "active" and body["lifecycle"] == "task" and body["ttl_seconds"] == 3600
    assert body["zone_id"] == zone.id and body["labels"] == ["a"] and body["parent_id"] is None
    assert "idempotency-replayed" not in r.headers
    assert r.headers["x-request-id"] == f"req-v1-begin-1-{zone.id}"
    row = await zone.session_row(body["agent_session_id"])
    assert row["application_id"] == "app-1" and row["zone_id"] == zone.id

    again = await zone.http.post("/v1/begin", json=_begin(zone, labels=["a"]),
                                 headers={**headers, "x-request-id": "req-v1-begin-2"})
    assert again.status_code == 201 and again.headers["idempotency-replayed"] == "true"
    assert again.json() == body

    # two audit records: the outer façade call (no zone) and the inner zone route, one request id
    records = await zone.stack.db.fetch("SELECT path, zone_id, status_code FROM admin_audit_events "
                                        "WHERE request_id = %s ORDER BY occurred_at, chain_seq",
                                        (f"req-v1-begin-1-{zone.id}",))
    assert sorted((r["path"], r["zone_id"]) for r in records) == sorted(
        [("/v1/begin", None), (f"/zones/{zone.id}/agents", zone.id)])


async def test_begin_forwards_only_supplied_options(zone: Zone):
    r = await zone.http.post("/v1/begin", json=_begin(zone, ttl_seconds=0), headers=zone.headers())
    assert r.status_code == 201 and r.json()["ttl_seconds"] == 3600  # falsy ttl is not forwarded
    r = await zone.http.post("/v1/begin", json=_begin(zone, ttl_seconds=120, metadata={"k": 1}), headers=zone.headers())
    assert r.status_code == 201 and r.json()["ttl_seconds"] == 120
    assert (await zone.session_row(r.json()["agent_session_id"]))["metadata_json"] == {"k": 1}
    r = await zone.http.post("/v1/begin", json=_begin(zone, lifecycle="service"), headers=zone.headers())
    assert r.status_code == 201 and r.json()["lifecycle"] == "service" and r.json()["ttl_seconds"] is None


async def test_begin_validation_and_authentication(zone: Zone):
    r = await zone.http.post("/v1/begin", json={"zone_id": zone.id, "application_id": "app-1"}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    assert r.json()["details"]["issues"][0]["path"] == ["subject_session_id"] and r.json()["requestId"]
    r = await zone.http.post("/v1/begin", json=_begin(zone, zone_id="z/../x"), headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post("/v1/begin", content=b"{nope", headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "internal_error"
    # authentication: the outer request, then the inner one
    r = await zone.http.post("/v1/begin", json=_begin(zone))
    assert r.status_code == 401 and r.json() == {"error": "missing_token"}
    r = await zone.http.post("/v1/begin", json=_begin(zone), headers=zone.operator_headers)
    assert r.status_code == 401 and r.json() == {"error": "invalid_token"}  # §13 case 9
    r = await zone.http.post("/v1/begin", json=_begin(zone, zone_id="some-other-zone"), headers=zone.headers())
    assert r.status_code == 403 and r.json() == {"error": "zone_mismatch"}
    # inner errors pass through unchanged
    r = await zone.http.post("/v1/begin", json=_begin(zone, application_id="app-2"), headers=zone.headers())
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    # every Idempotency-Key value is forwarded; the inner route refuses two, with the outer request id
    headers = [*zone.headers().items(), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
    r = await zone.http.post("/v1/begin", json=_begin(zone), headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "idempotency_key_multiple"
    assert r.json()["request_id"] == r.headers["x-request-id"]


async def test_spawn_child_and_end(zone: Zone):
    parent = (await zone.http.post("/v1/begin", json=_begin(zone), headers=zone.headers())).json()["agent_session_id"]
    r = await zone.http.post("/v1/spawn-child", json=_begin(zone), headers=zone.headers())
    assert r.status_code == 400 and r.json()["details"]["issues"][0]["path"] == ["parent_agent_session_id"]
    r = await zone.http.post("/v1/spawn-child", json=_begin(zone, parent_agent_session_id=parent, parent_id="ignored"),
                             headers=zone.headers())
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["parent_id"] == parent and child["depth"] == 1

    r = await zone.http.post("/v1/end", json={"zone_id": zone.id}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post("/v1/end", json={"zone_id": zone.id, "agent_session_id": parent},
                             headers=zone.headers("app-2", "ar-2"))
    assert r.status_code == 403 and r.json() == {"error": "application_ownership_required"}
    r = await zone.http.post("/v1/end", json={"zone_id": zone.id, "agent_session_id": child["agent_session_id"],
                                              "reason": "done here"}, headers=zone.headers())
    assert r.status_code == 204 and r.content == b""
    row = await zone.session_row(child["agent_session_id"])
    assert row["status"] == "terminated" and row["termination_reason"] == "done here"
    r = await zone.http.post("/v1/end", json={"zone_id": zone.id, "agent_session_id": child["agent_session_id"]},
                             headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}  # §13 case 111
    r = await zone.http.post("/v1/end", json={"zone_id": zone.id, "agent_session_id": "ghost"}, headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}


async def test_exchange_delegate_and_revoke(zone: Zone):
    a = (await zone.start())["agent_session_id"]
    b = (await zone.start())["agent_session_id"]
    c = (await zone.start())["agent_session_id"]
    edge = {"issuer_application_id": "app-1", "receiver_application_id": "app-1", "resource_id": "res-1",
            "scopes": ["read"], "constraints_json": {"max_hops": 3}}

    # §13 case 112: expires_at is required by the façade
    r = await zone.http.post("/v1/exchange", json={"zone_id": zone.id, "source_session_id": a,
                                                   "target_session_id": b, **edge}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    assert r.json()["details"]["issues"][0]["path"] == ["expires_at"]
    r = await zone.http.post("/v1/exchange", json={"zone_id": zone.id, "source_session_id": a, "target_session_id": b,
                                                   "expires_at": "tomorrow", **edge}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    forwarded = ExchangeBody.model_validate({"zone_id": zone.id, "source_session_id": a, "target_session_id": b,
                                             "expires_at": _expires(), **edge})
    assert "zone_id" not in forwarded.edge_body(a, b)

    # the inner route's own errors come back unchanged
    r = await zone.http.post("/v1/exchange", json={"zone_id": zone.id, "source_session_id": a, "target_session_id": b,
                                                   "expires_at": _expires(), **edge, "issuer_application_id": "app-2"},
                             headers=zone.headers())
    _skip_without_route(r)
    assert r.status_code == 403 and r.json() == {"error": "issuer_ownership_required"}, r.text

    key = f"k-{uuid.uuid4().hex}"
    body = {"zone_id": zone.id, "source_session_id": a, "target_session_id": b, "expires_at": _expires(), **edge}
    r = await zone.http.post("/v1/exchange", json=body, headers=zone.headers(**{"Idempotency-Key": key}))
    assert r.status_code == 201, r.text
    e1 = r.json()
    assert (e1["source_session_id"], e1["target_session_id"], e1["resource_id"]) == (a, b, "res-1")
    r = await zone.http.post("/v1/exchange", json=body, headers=zone.headers(**{"Idempotency-Key": key}))
    assert r.status_code == 201 and r.headers.get("idempotency-replayed") == "true" and r.json() == e1

    # §13 case 113: from/to become source/target
    r = await zone.http.post("/v1/delegate-to-existing-agent", json={
        "zone_id": zone.id, "from_agent_session_id": b, "to_agent_session_id": c, "expires_at": _expires(5), **edge,
        "constraints_json": {"max_hops": 2}},
        headers=zone.headers())
    assert r.status_code == 201, r.text
    e2 = r.json()
    assert (e2["source_session_id"], e2["target_session_id"]) == (b, c)

    # §13 case 114: the inner 200 body comes back
    r = await zone.http.post("/v1/revoke-delegation", json={"zone_id": zone.id}, headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post("/v1/revoke-delegation", json={"zone_id": zone.id, "delegation_edge_id": "ghost"},
                             headers=zone.headers())
    assert r.status_code == 404 and r.json() == {"error": "delegation_not_found"}
    r = await zone.http.post("/v1/revoke-delegation", json={"zone_id": zone.id,
                                                            "delegation_edge_id": e1["delegation_edge_id"]},
                             headers=zone.headers())
    assert r.status_code == 200, r.text
    assert r.json()["revoked_edges"] == 2
    assert (await zone.stack.db.fetchval("SELECT status FROM delegation_edges WHERE id = %s",
                                         (e2["delegation_edge_id"],))) == "revoked"


async def test_verify(zone: Zone, signing_key):
    # §13 case 115 (the rate limit part is in test_ratelimit.py)
    r = await zone.http.post("/v1/verify", json={"zone_id": zone.id})
    assert r.status_code == 400 and r.json() == {"valid": False, "error": "missing_token"}
    r = await zone.http.post("/v1/verify")
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post("/v1/verify", json={"token": "x"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post("/v1/verify", json={"token": "not-a-jwt", "zone_id": zone.id})
    assert r.status_code == 401 and r.json() == {"valid": False, "error": "token_invalid"}

    token = mint_token(signing_key, issuer=ISSUER, zone_id=zone.id, client_id="app-1", sid="ar-1",
                       scopes=["agent:lifecycle", "read"], sub="user-7", sub_type="user",
                       extra={"root_sid": "ar-root", "agent_session_id": "s-1", "hop_count": 2,
                              "delegation_chain": [{"application_id": "app-0", "agent_session_id": "s-0"}]})
    for body in ({"token": token}, {"authorization": f"Bearer {token}"}, {"authorization": token}):
        r = await zone.http.post("/v1/verify", json={"zone_id": zone.id, **body})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["valid"] is True
        claims = out["claims"]
        assert claims["sub"] == "user-7" and claims["zoneId"] == zone.id and claims["clientId"] == "app-1"
        assert claims["sid"] == "ar-1" and claims["rootSid"] == "ar-root" and claims["subType"] == "user"
        assert claims["agentSessionId"] == "s-1" and claims["hopCount"] == 2
        assert claims["delegationChain"] == [{"applicationId": "app-0", "agentSessionId": "s-0"}]
        assert "delegationEdgeId" not in claims
    # another zone, a missing required scope, a required delegation: all just token_invalid
    for extra in ({"zone_id": "other-zone"}, {"required_scope": "write"}, {"require_delegation": True}):
        r = await zone.http.post("/v1/verify", json={"zone_id": zone.id, "token": token, **extra})
        assert r.status_code == 401 and r.json() == {"valid": False, "error": "token_invalid"}, extra
    r = await zone.http.post("/v1/verify", json={"zone_id": zone.id, "token": token, "required_scope": "read",
                                                 "require_agent": True})
    assert r.status_code == 200 and r.json()["valid"] is True
