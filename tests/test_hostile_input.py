"""Hostile and off-contract inputs: each answers 4xx with a JSON error and changes nothing.

One test per case. "Nothing changed" is checked on the rows the request would have written (no
session, no service, no edge, no invocation) or, for reads, on the answer of the same read.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from api.app import create_app
from api.auth import Authenticator
from api.deps import Services
from api.http import MAX_JSON_DEPTH
from tests.conftest import OPERATOR_TOKEN, Zone
from tests.contract.server import serve

DEEP = 10_000


def deep_arrays(n: int = DEEP) -> str:
    return "[" * n + "]" * n


def deep_objects(n: int = DEEP) -> str:
    return '{"a":' * n + "1" + "}" * n


def json_headers(zone: Zone, **extra: str) -> dict[str, str]:
    return {**zone.headers(), "content-type": "application/json", **extra}


async def count(zone: Zone, table: str) -> int:
    return await zone.stack.db.fetchval(f"SELECT count(*) FROM {table} WHERE zone_id = %s", (zone.id,))


def assert_invalid_body(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_body" and body["requestId"] and body["error_description"], body
    assert body["details"]["issues"] and all(isinstance(i["message"], str) for i in body["details"]["issues"])
    return body


def session_body(zone: Zone, **fields: Any) -> dict[str, Any]:
    return {"application_id": "app-1", "subject_session_id": "ar-1", **fields}


async def post_session_raw(zone: Zone, raw: str | bytes, **headers: str) -> httpx.Response:
    return await zone.http.post(f"/zones/{zone.id}/agents", content=raw, headers=json_headers(zone, **headers))


async def register_service(zone: Zone, **fields: Any) -> httpx.Response:
    body = {"application_id": "app-1", "endpoint_url": "https://svc.test/rpc", **fields}
    return await zone.http.post(f"/zones/{zone.id}/agent-services", json=body, headers=zone.headers())


# ---------------------------------------------------------------------------------------------- nesting


async def test_deeply_nested_arrays_as_session_body(zone: Zone):
    r = await post_session_raw(zone, deep_arrays())
    body = assert_invalid_body(r)
    assert str(MAX_JSON_DEPTH) in body["error_description"]
    assert await count(zone, "sessions") == 0


async def test_deeply_nested_objects_as_session_body(zone: Zone):
    assert_invalid_body(await post_session_raw(zone, deep_objects()))
    assert await count(zone, "sessions") == 0


async def test_deeply_nested_metadata(zone: Zone):
    raw = json.dumps(session_body(zone))[:-1] + ', "metadata": {"x": ' + deep_arrays() + "}}"
    assert_invalid_body(await post_session_raw(zone, raw))
    raw = json.dumps(session_body(zone))[:-1] + ', "metadata": ' + deep_objects() + "}"
    assert_invalid_body(await post_session_raw(zone, raw))
    assert await count(zone, "sessions") == 0


async def test_nesting_at_the_limit_is_accepted(zone: Zone):
    # 64 levels in all: the body object, metadata, then 62 more.
    inner = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)
    raw = json.dumps(session_body(zone))[:-1] + ', "metadata": {"x": ' + inner + "}}"
    r = await post_session_raw(zone, raw)
    assert r.status_code == 201, r.text
    inner = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    raw = json.dumps(session_body(zone))[:-1] + ', "metadata": {"x": ' + inner + "}}"
    assert_invalid_body(await post_session_raw(zone, raw))
    assert await count(zone, "sessions") == 1


async def test_deeply_nested_delegation_constraints(zone: Zone):
    a = (await zone.start())["agent_session_id"]
    b = (await zone.start())["agent_session_id"]
    body = {"source_session_id": a, "target_session_id": b, "issuer_application_id": "app-1",
            "receiver_application_id": "app-1", "resource_id": "res-1", "scopes": ["read"], "ttl_seconds": 60}
    for nested in (deep_arrays(), deep_objects()):
        raw = json.dumps(body)[:-1] + ', "constraints": {"resources": ' + nested + "}}"
        r = await zone.http.post(f"/zones/{zone.id}/delegations", content=raw, headers=json_headers(zone))
        assert_invalid_body(r)
    assert await count(zone, "delegation_edges") == 0


async def test_deeply_nested_verify_body(zone: Zone):
    for nested in (deep_arrays(), deep_objects()):
        r = await zone.http.post("/v1/verify", content=nested, headers={"content-type": "application/json"})
        assert_invalid_body(r)
    # the public route still answers normally afterwards
    r = await zone.http.post("/v1/verify", json={"zone_id": zone.id, "token": zone.token()})
    assert r.status_code == 200 and r.json()["valid"] is True


# ---------------------------------------------------------------------------------------------- numbers


async def test_non_finite_numbers_in_session_metadata(zone: Zone):
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" * 400):
        raw = json.dumps(session_body(zone))[:-1] + ', "metadata": {"x": ' + literal + "}}"
        body = assert_invalid_body(await post_session_raw(zone, raw))
        assert body["details"]["issues"][0]["message"].startswith("numbers must be finite"), body
    assert await count(zone, "sessions") == 0


async def test_non_finite_numbers_in_invocation_params(zone: Zone):
    service = (await register_service(zone)).json()
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
        raw = json.dumps({"service_id": service["id"], "idempotency_key": "k-1", "method": "run"})[:-1]
        raw += ', "params": {"x": [1, ' + literal + "]}}"
        r = await zone.http.post(f"/zones/{zone.id}/invocations", content=raw, headers=json_headers(zone))
        assert_invalid_body(r)
    assert await count(zone, "agent_invocations") == 0


# ---------------------------------------------------------------------------------------------- strings


async def test_nul_in_a_metadata_key(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", json=session_body(zone, metadata={"a\u0000b": 1}),
                             headers=zone.headers())
    body = assert_invalid_body(r)
    assert "U+0000" in body["details"]["issues"][0]["message"]
    assert await count(zone, "sessions") == 0


async def test_nul_in_a_metadata_value(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", json=session_body(zone, metadata={"k": ["ok", "x\u0000"]}),
                             headers=zone.headers())
    body = assert_invalid_body(r)
    assert body["details"]["issues"][0]["path"] == ["metadata", "k", 1]
    assert await count(zone, "sessions") == 0


async def test_nul_in_a_label(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", json=session_body(zone, labels=["\u0000"]),
                             headers=zone.headers())
    assert_invalid_body(r)
    assert await count(zone, "sessions") == 0


async def test_lone_surrogate(zone: Zone):
    for raw in ('{"application_id": "app-1", "metadata": {"k": "\\ud800"}}',
                '{"application_id": "app-1", "labels": ["x\\udfff"]}',
                '{"application_id": "app-1", "metadata": {"\\ud800": 1}}'):
        body = assert_invalid_body(await post_session_raw(zone, raw))
        assert "surrogate" in body["details"]["issues"][0]["message"]
    # a surrogate pair is one valid character
    r = await post_session_raw(zone, '{"application_id": "app-1", "metadata": {"k": "\\ud83d\\ude00"}}')
    assert r.status_code == 201, r.text
    assert (await zone.session_row(r.json()["agent_session_id"]))["metadata_json"] == {"k": "\U0001f600"}
    assert await count(zone, "sessions") == 1


async def test_nul_in_a_query_parameter(zone: Zone):
    before = (await zone.http.get(f"/zones/{zone.id}/agents", headers=zone.headers())).json()
    r = await zone.http.get(f"/zones/{zone.id}/agents?label=a%00b", headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_query", r.text
    assert (await zone.http.get(f"/zones/{zone.id}/agents", headers=zone.headers())).json() == before


# ---------------------------------------------------------------------------------------------- media types


async def test_text_plain_body_is_not_read(zone: Zone):
    raw = json.dumps(session_body(zone))
    r = await post_session_raw(zone, raw, **{"content-type": "text/plain"})
    body = assert_invalid_body(r)
    assert body["details"]["issues"] == [{"path": [], "message": "Required"}]
    assert await count(zone, "sessions") == 0


async def test_form_body_is_not_read(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", data={"application_id": "app-1"}, headers=zone.headers())
    assert_invalid_body(r)
    r = await post_session_raw(zone, json.dumps(session_body(zone)),
                               **{"content-type": "application/x-www-form-urlencoded"})
    assert_invalid_body(r)
    assert await count(zone, "sessions") == 0


async def test_xml_body_is_unsupported_media(zone: Zone):
    for media in ("application/xml", "text/xml"):
        r = await post_session_raw(zone, "<session application_id='app-1'/>", **{"content-type": media})
        assert r.status_code == 415, r.text
        assert r.json()["error"] == "internal_error" and r.json()["requestId"]
    assert await count(zone, "sessions") == 0


async def test_json_suffix_media_type_is_json(zone: Zone):
    r = await post_session_raw(zone, json.dumps(session_body(zone)), **{"content-type": "application/vnd.x+json"})
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------------------------------------- contract gaps


async def test_empty_protocol_version(zone: Zone):
    r = await register_service(zone, protocol_versions=[""])
    body = assert_invalid_body(r)
    assert body["details"]["issues"][0]["path"] == ["protocol_versions", 0]
    assert await count(zone, "agent_services") == 0


async def test_explicit_null_subject_session_id(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", json={"application_id": "app-1", "subject_session_id": None},
                             headers=zone.headers())
    assert assert_invalid_body(r)["details"]["issues"][0]["path"] == ["subject_session_id"]
    assert await count(zone, "sessions") == 0


async def test_explicit_null_ttl_seconds(zone: Zone):
    r = await zone.http.post(f"/zones/{zone.id}/agents", json=session_body(zone, ttl_seconds=None),
                             headers=zone.headers())
    assert assert_invalid_body(r)["details"]["issues"][0]["path"] == ["ttl_seconds"]
    assert await count(zone, "sessions") == 0


async def test_explicit_null_inherit_parent_edge_id(zone: Zone):
    parent = (await zone.start())["agent_session_id"]
    r = await zone.http.post(f"/zones/{zone.id}/agents",
                             json=session_body(zone, parent_id=parent, inherit_parent_edge_id=None),
                             headers=zone.headers())
    assert assert_invalid_body(r)["details"]["issues"][0]["path"] == ["inherit_parent_edge_id"]
    assert await count(zone, "sessions") == 1
    # parent_id stays nullable, as in the reference
    r = await zone.http.post(f"/zones/{zone.id}/agents", json=session_body(zone, parent_id=None),
                             headers=zone.headers())
    assert r.status_code == 201, r.text


async def test_endpoint_url_must_be_http(zone: Zone):
    for url in ("javascript:alert(1)", "ftp://files.test/x", "file:///etc/passwd", "nope", "http://", "https:// x",
                "data:text/html,hi"):
        r = await register_service(zone, endpoint_url=url)
        assert assert_invalid_body(r)["details"]["issues"][0]["path"] == ["endpoint_url"], url
    assert await count(zone, "agent_services") == 0
    r = await register_service(zone, endpoint_url="HTTPS://svc.test:8443/rpc?v=1")
    assert r.status_code == 201 and r.json()["endpoint_url"] == "HTTPS://svc.test:8443/rpc?v=1", r.text


async def test_unsupported_method_answers_405_with_allow(zone: Zone):
    before = (await zone.http.get(f"/zones/{zone.id}/agents", headers=zone.headers())).json()
    for method, path, allowed in (("TRACE", f"/zones/{zone.id}/agents", {"GET", "POST"}),
                                  ("PUT", f"/zones/{zone.id}/agents", {"GET", "POST"}),
                                  ("TRACE", "/health", {"GET"}),
                                  ("DELETE", f"/zones/{zone.id}/delegations/e1/revoke", {"PATCH"})):
        r = await zone.http.request(method, path, headers=zone.headers())
        assert r.status_code == 405 and r.json() == {"error": "method_not_allowed"}, (method, path, r.text)
        assert {m.strip() for m in r.headers["allow"].split(",")} >= allowed, r.headers
    assert (await zone.http.get(f"/zones/{zone.id}/agents", headers=zone.headers())).json() == before


async def test_repeated_query_key_first_value_wins(zone: Zone):
    await zone.start()
    await zone.start()
    r = await zone.http.get(f"/zones/{zone.id}/agents?limit=1&limit=abc", headers=zone.headers())
    assert r.status_code == 200 and len(r.json()["items"]) == 1, r.text
    r = await zone.http.get(f"/zones/{zone.id}/agents?limit=abc&limit=1", headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_query"


# ---------------------------------------------------------------------------------------------- 500s


class _BrokenDatabase:
    """Every use fails with an error that is not an outage: an unhandled 500."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"broken on purpose: Database.{name}")


async def test_unhandled_500_keeps_the_connection_usable(zone: Zone):
    settings = zone.stack.settings
    auth = Authenticator(settings, zone.stack.db)
    app = create_app(services=Services(settings, _BrokenDatabase(), zone.stack.services.temporal, auth))  # type: ignore[arg-type]
    connections: list[str] = []

    async def trace(name: str, info: Any) -> None:
        if name == "connection.connect_tcp.complete":
            connections.append(name)

    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(3):
                r = await http.get(f"/zones/{zone.id}/agents", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                                   extensions={"trace": trace})
                assert r.status_code == 500, r.text
                assert r.json()["error"] == "internal_error" and r.json()["requestId"]
                assert r.headers.get("connection", "").lower() != "close"
                # the next request on the same keep-alive connection is answered
                r = await http.get("/health", extensions={"trace": trace})
                assert r.status_code == 200 and r.json() == {"ok": True}
        assert len(connections) == 1, "the client had to reconnect"
    finally:
        await auth.aclose()
