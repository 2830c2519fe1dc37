"""HTTP-level authentication and plumbing (reference-behaviour §2, §3.1; §13 cases 1-17).

Everything goes through the real app over httpx. Case 18 (rate limits) lives elsewhere.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from api.app import create_app
from api.auth import Authenticator
from api.deps import Services
from devstack.tokens import mint_token
from storage.db import Database
from tests.conftest import ISSUER, OPERATOR_TOKEN, Zone


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _unsigned(payload: dict) -> str:
    """A JWT-shaped string with an ES256 header and a junk signature (never verifiable)."""
    def seg(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{seg({'alg': 'ES256', 'typ': 'JWT', 'kid': 'test-key-1'})}.{seg(payload)}.c2ln"


# ---------------------------------------------------------------------------------------------- 1, 2


async def test_missing_or_malformed_bearer_is_missing_token(zone: Zone):
    url = f"/zones/{zone.id}/agents"
    for headers in ({}, {"Authorization": "Basic x"}, {"Authorization": "bearer " + zone.token()},
                    {"Authorization": "Bearer "}, {"Authorization": "Bearer " + "a" * 4097}):
        r = await zone.http.get(url, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json() == {"error": "missing_token"}
    r = await zone.http.get(url, headers={"Authorization": "Bearer " + "a" * 4096})  # at the limit: parsed
    assert r.status_code == 401 and r.json() == {"error": "invalid_token"}
    r = await zone.http.get(url, headers={"Authorization": "Bearer  " + zone.token() + "  "})  # trimmed
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- 3


class _JwksServer:
    """A real HTTP server publishing the test JWKS; counts the requests it answers."""

    def __init__(self, jwks: dict) -> None:
        body = json.dumps(jwks).encode()
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json?zone_id={{zone_id}}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_bad_zone_claim_is_rejected_without_fetching_keys(zone: Zone):
    server = _JwksServer(zone.key.jwks)
    settings = zone.stack.settings.model_copy(update={"JWKS_FILE": "", "JWKS_URL": server.url})
    auth = Authenticator(settings, zone.stack.db)
    app = create_app(services=Services(settings, zone.stack.db, zone.stack.services.temporal, auth))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coordinator.test")
    try:
        bad = mint_token(zone.key, issuer=ISSUER, zone_id="../z1", client_id="app-1", sid="ar-1",
                         scopes=["agent:lifecycle"])
        for token in (bad, _unsigned({"zone_id": "../z1", "sub": "x"}), _unsigned({"sub": "x"}), "not-a-jwt"):
            r = await http.get(f"/zones/{zone.id}/agents", headers=_bearer(token))
            assert r.status_code == 401 and r.json() == {"error": "invalid_token"}, r.text
        assert server.requests == []
        # The same server does serve a good token (so the zero above means something).
        r = await http.get(f"/zones/{zone.id}/agents", headers=zone.headers())
        assert r.status_code == 200, r.text
        assert server.requests == [f"/.well-known/jwks.json?zone_id={zone.id}"]
    finally:
        await http.aclose()
        await auth.aclose()
        server.close()


# ---------------------------------------------------------------------------------------------- 4


async def test_signature_issuer_audience_and_expiry(zone: Zone):
    url = f"/zones/{zone.id}/agents"
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {"iss": ISSUER, "aud": [ISSUER], "sub": "app-1", "iat": now, "exp": now + 600, "jti": "j",
              "zone_id": zone.id, "client_id": "app-1", "scope": "agent:lifecycle", "sid": "ar-1", "use": "session"}
    rs256 = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": zone.key.kid})
    # ES256 with another key under the same kid: signature does not verify.
    from devstack.keys import generate_signing_key
    stranger = generate_signing_key(kid=zone.key.kid)
    rejected = [
        rs256,
        mint_token(stranger, issuer=ISSUER, zone_id=zone.id, client_id="app-1", sid="ar-1", scopes=["agent:lifecycle"]),
        mint_token(zone.key, issuer="http://other.test/sts", zone_id=zone.id, client_id="app-1", sid="ar-1",
                   scopes=["agent:lifecycle"]),
        zone.token(extra={"aud": ["http://other.test/aud"]}),
        zone.token(extra={"iss": "http://other.test/sts"}),
        zone.token(now=now - 700, ttl_seconds=600),  # expired 100 s ago (> 60 s leeway)
    ]
    for token in rejected:
        r = await zone.http.get(url, headers=_bearer(token))
        assert r.status_code == 401 and r.json() == {"error": "invalid_token"}, r.text
    r = await zone.http.get(url, headers=_bearer(zone.token(now=now - 630, ttl_seconds=600)))  # expired 30 s ago
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- 5-8


async def test_scope_zone_client_and_identity_checks(zone: Zone):
    url = f"/zones/{zone.id}/agents"
    no_scope = mint_token(zone.key, issuer=ISSUER, zone_id=zone.id, client_id="app-1", sid="ar-1", scopes=["other"])
    r = await zone.http.get(url, headers=_bearer(no_scope))
    assert r.status_code == 403 and r.json() == {"error": "missing_scope"}

    r = await zone.http.get("/zones/z2/agents", headers=zone.headers())
    assert r.status_code == 403 and r.json() == {"error": "zone_mismatch"}

    r = await zone.http.get(url, headers=_bearer(zone.token(extra={"client_id": None})))
    assert r.status_code == 401 and r.json() == {"error": "invalid_token"}
    r = await zone.http.get(url, headers=_bearer(zone.token(extra={"client_id": ""})))
    assert r.status_code == 401 and r.json() == {"error": "invalid_token"}

    # An unknown application, an archived one, a revoked authority record: identity_revoked.
    r = await zone.http.get(url, headers=zone.headers(app="ghost-app"))
    assert r.status_code == 401 and r.json() == {"error": "identity_revoked"}
    assert (await zone.http.get(url, headers=zone.headers(app="app-2", sid="ar-2"))).status_code == 200
    r = await zone.http.post(f"/zones/{zone.id}/applications/app-2/archive", headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    r = await zone.http.get(url, headers=zone.headers(app="app-2", sid=None))
    assert r.status_code == 401 and r.json() == {"error": "identity_revoked"}
    r = await zone.http.post(f"/zones/{zone.id}/authority-records/ar-2/revoke", headers=zone.operator_headers)
    assert r.status_code == 200, r.text
    r = await zone.http.get(url, headers=zone.headers(app="app-1", sid="ar-2"))
    assert r.status_code == 401 and r.json() == {"error": "identity_revoked"}
    # A token without sid skips the authority-record check.
    assert (await zone.http.get(url, headers=zone.headers(sid=None))).status_code == 200


# ---------------------------------------------------------------------------------------------- 9, 10


async def test_operator_token(zone: Zone):
    op = zone.operator_headers
    r = await zone.http.get(f"/zones/{zone.id}/agents", headers=op)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}, r.text
    # The operator is an admin: it may suspend any session (the handler is reached).
    r = await zone.http.patch(f"/zones/{zone.id}/agents/a1/suspend", headers=op)
    assert r.status_code == 404 and r.json() == {"error": "session_not_found"}
    s = await zone.start()
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{s['agent_session_id']}/suspend", headers=op)
    assert r.status_code == 200 and r.json() == {"suspended": 1}, r.text
    r = await zone.http.get(f"/zones/{zone.id}/agents/{s['agent_session_id']}", headers=op)
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    r = await zone.http.get(f"/zones/{zone.id}/agent-services", headers=op)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}, r.text
    r = await zone.http.get(f"/zones/{zone.id}/invocations", headers=op)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}, r.text
    r = await zone.http.get("/stats", headers=op)
    assert r.status_code == 200 and isinstance(r.json(), dict), r.text
    r = await zone.http.get("/metrics", headers=op)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    # The identity the operator gets (what the handlers above saw).
    ident = await zone.stack.services.auth.authenticate(
        method="GET", path=f"/zones/{zone.id}/agents", authorization=f"Bearer {OPERATOR_TOKEN}", route_zone_id=zone.id)
    assert ident.operator and ident.client_id == "caracal-operator" and ident.subject == "caracal-operator"
    assert ident.scopes == {"agent:lifecycle", "coordinator.admin"} and ident.zone_id == zone.id
    # Routes outside the allowlist: the operator token is not a JWT.
    for method, path, body in (("POST", f"/zones/{zone.id}/agents", {"application_id": "app-1"}),
                               ("GET", f"/zones/{zone.id}/invocations/i1", None),
                               ("POST", f"/zones/{zone.id}/invocations", {"service_id": "x"}),
                               ("POST", f"/zones/{zone.id}/agents/a1/heartbeat", {}),
                               ("POST", "/v1/begin", {"zone_id": zone.id, "application_id": "app-1"})):
        r = await zone.http.request(method, path, json=body, headers=op)
        assert r.status_code == 401 and r.json() == {"error": "invalid_token"}, (path, r.text)


async def test_operator_only_paths_refuse_mandates(zone: Zone):  # 10
    for path in ("/stats", "/metrics"):
        r = await zone.http.get(path, headers=zone.headers(scopes=["coordinator.admin"]))
        assert r.status_code == 403 and r.json() == {"error": "operator_token_required"}, r.text
        r = await zone.http.get(path)
        assert r.status_code == 401 and r.json() == {"error": "missing_token"}


# ---------------------------------------------------------------------------------------------- 11


async def test_public_paths_need_no_bearer(zone: Zone):
    r = await zone.http.get("/health")
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await zone.http.get("/ready")
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    r = await zone.http.post("/v1/verify", json={"zone_id": zone.id})
    assert r.status_code == 400 and r.json() == {"valid": False, "error": "missing_token"}, r.text
    r = await zone.http.post("/v1/verify", json={"zone_id": zone.id, "token": zone.token()})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text


# ---------------------------------------------------------------------------------------------- 12-17


async def test_invalid_path_params_touch_no_database(zone: Zone):
    # An app whose database was never opened: any query would fail (5xx); 400 means none ran.
    settings = zone.stack.settings
    closed = Database(settings.DATABASE_URL)
    auth = Authenticator(settings, closed)
    app = create_app(services=Services(settings, closed, zone.stack.services.temporal, auth))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test") as http:
        for path in ("/zones/z!1/agents", "/zones/z!1/agent-services", "/zones/z!1/agents/a1/children"):
            r = await http.get(path, headers=zone.headers())
            assert r.status_code == 400 and r.json() == {"error": "invalid_params"}, r.text
        r = await http.patch("/zones/z1/agents/a$1/suspend", headers=zone.headers())
        assert r.status_code == 400 and r.json() == {"error": "invalid_params"}, r.text
        r = await http.get(f"/zones/{zone.id}/agents", headers=zone.headers())
        assert r.status_code >= 500  # the same app does need its database for a valid request
    await auth.aclose()


async def test_invalid_path_params(zone: Zone):
    for path in ("/zones/z!1/agents", "/zones/z!1/agent-services", f"/zones/{zone.id}/agents/a%20b",
                 f"/zones/{zone.id}/agents/a%2Fb/children", "/zones/" + "z" * 129 + "/agents"):
        # Path ids are checked before the bearer and before any database access.
        r = await zone.http.get(path, headers={"Authorization": "Bearer junk"})
        assert r.status_code == 400 and r.json() == {"error": "invalid_params"}, (path, r.text)
        r = await zone.http.get(path)
        assert r.status_code == 400 and r.json() == {"error": "invalid_params"}, (path, r.text)


async def test_invalid_query_and_cursor(zone: Zone):
    url = f"/zones/{zone.id}/agents"
    for query in ("limit=abc", "limit=0", "limit=501", "status=bogus", "lifecycle=daemon", "cursor=",
                  "limit=1.5"):
        r = await zone.http.get(f"{url}?{query}", headers=zone.headers())
        assert r.status_code == 400 and r.json()["error"] == "invalid_query", (query, r.text)
    r = await zone.http.get(f"{url}?cursor=ghost", headers=zone.headers())
    assert r.status_code == 400 and r.json() == {"error": "invalid_cursor"}
    # A session id of another zone is not a cursor here.
    other = await zone.start()
    r = await zone.http.get(f"/zones/z-elsewhere/agents?cursor={other['agent_session_id']}",
                            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert r.status_code == 400 and r.json() == {"error": "invalid_cursor"}
    r = await zone.http.get(f"{url}/{other['agent_session_id']}/children?cursor=ghost", headers=zone.headers())
    assert r.status_code == 400 and r.json() == {"error": "invalid_cursor"}
    r = await zone.http.get(f"{url}/{other['agent_session_id']}/children?status=bogus", headers=zone.headers())
    assert r.status_code == 400 and r.json()["error"] == "invalid_query"
    for q in ("reason=", "reason=" + "r" * 257):
        r = await zone.http.delete(f"{url}/{other['agent_session_id']}?{q}", headers=zone.headers())
        assert r.status_code == 400 and r.json()["error"] == "invalid_query", r.text


async def test_pagination(zone: Zone):
    ids = [(await zone.start())["agent_session_id"] for _ in range(3)]
    newest_first = sorted(ids, reverse=True)
    url = f"/zones/{zone.id}/agents"
    r = await zone.http.get(f"{url}?limit=2", headers=zone.headers())
    page = r.json()
    assert [i["agent_session_id"] for i in page["items"]] == newest_first[:2]
    assert page["next_cursor"] == newest_first[1]
    r = await zone.http.get(f"{url}?limit=2&cursor={page['next_cursor']}", headers=zone.headers())
    page = r.json()
    assert [i["agent_session_id"] for i in page["items"]] == newest_first[2:]
    assert page["next_cursor"] is None
    r = await zone.http.get(f"{url}?limit=3", headers=zone.headers())
    assert r.json()["next_cursor"] == newest_first[2]  # a full page always carries a cursor
    r = await zone.http.get(f"{url}?limit=500", headers=zone.headers())
    assert len(r.json()["items"]) == 3 and r.json()["next_cursor"] is None


async def test_list_filters_are_anded(zone: Zone):
    match = await zone.start(lifecycle="service", labels=["worker", "blue"])
    await zone.start(lifecycle="service", labels=["other"])  # label differs
    await zone.start(labels=["worker"])  # lifecycle differs
    await zone.start("app-2", headers=zone.headers("app-2"), lifecycle="service", labels=["worker"])  # app differs
    suspended = await zone.start(lifecycle="service", labels=["worker"])
    r = await zone.http.patch(f"/zones/{zone.id}/agents/{suspended['agent_session_id']}/suspend",
                              headers=zone.headers())
    assert r.status_code == 200
    r = await zone.http.get(f"/zones/{zone.id}/agents?status=active&lifecycle=service&application_id=app-1"
                            f"&label=worker", headers=zone.headers())
    assert r.status_code == 200, r.text
    assert [i["agent_session_id"] for i in r.json()["items"]] == [match["agent_session_id"]]
    item = r.json()["items"][0]
    assert set(item) >= {"agent_session_id", "zone_id", "application_id", "parent_id", "subject_authority_record_id",
                         "lifecycle", "labels", "status", "depth", "ttl_seconds", "metadata", "started_at",
                         "terminated_at", "termination_reason", "last_heartbeat_at", "heartbeat_deadline_at"}
    r = await zone.http.get(f"/zones/{zone.id}/agents?status=suspended", headers=zone.headers())
    assert [i["agent_session_id"] for i in r.json()["items"]] == [suspended["agent_session_id"]]
    r = await zone.http.get(f"/zones/{zone.id}/agents?label=blue", headers=zone.headers())
    assert [i["agent_session_id"] for i in r.json()["items"]] == [match["agent_session_id"]]


async def test_malformed_json_and_invalid_body(zone: Zone):
    url = f"/zones/{zone.id}/agents"
    headers = {**zone.headers(), "content-type": "application/json", "x-request-id": "req-17"}
    r = await zone.http.post(url, content=b'{"application_id": "app-1",', headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "internal_error" and body["requestId"] == "req-17" and body["error_description"]
    assert r.headers["x-request-id"] == "req-17"
    r = await zone.http.post(url, json={"application_id": 7, "labels": "x"}, headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_body" and body["requestId"] == "req-17" and body["error_description"]
    paths = sorted(tuple(i["path"]) for i in body["details"]["issues"])
    assert ("application_id",) in paths and ("labels",) in paths
    assert all(isinstance(i["message"], str) for i in body["details"]["issues"])
    r = await zone.http.post(url, json=["not", "an", "object"], headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    r = await zone.http.post(url, content=b"", headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    # A too-large body and an unacceptable request id.
    big = {"application_id": "app-1", "metadata": {"x": "a" * 300_000}}
    r = await zone.http.post(url, json=big, headers={**zone.headers(), "x-request-id": "bad id!"})
    assert r.status_code == 413 and r.json()["error"] == "internal_error"
    assert r.headers["x-request-id"] != "bad id!" and r.json()["requestId"] == r.headers["x-request-id"]
    raw = json.dumps(big).encode()

    async def chunked():  # no Content-Length: the limit is enforced on the bytes read
        for i in range(0, len(raw), 65536):
            yield raw[i:i + 65536]
    r = await zone.http.post(url, content=chunked(), headers={**zone.headers(), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "internal_error", r.text
    assert await zone.stack.db.fetchval("SELECT count(*) FROM sessions WHERE zone_id = %s", (zone.id,)) == 0


class _CountingDatabase:
    """The stack's database, counting identity reads; `change_during_read` makes a directory
    change land while a read is in flight (as a revocation committed by another process would)."""

    def __init__(self, db: Database) -> None:
        self.db, self.url, self.reads = db, db.url, 0
        self.change_during_read = None

    async def fetchrow(self, sql, params):
        self.reads += 1
        row = await self.db.fetchrow(sql, params)
        if self.change_during_read is not None:
            self.change_during_read()
        return row


async def test_identity_cache_answers_repeats_but_never_caches_a_read_overtaken_by_a_change(stack, zone: Zone):
    from tests.conftest import eventually

    db = _CountingDatabase(stack.db)
    auth = Authenticator(stack.settings, db)
    try:
        auth._caching()  # starts the directory listener
        await eventually(lambda: _true(auth._caching()))
        ask = dict(method="GET", path=f"/zones/{zone.id}/agents", authorization=f"Bearer {zone.token()}",
                   route_zone_id=zone.id)
        await auth.authenticate(**ask)
        await auth.authenticate(**ask)
        assert db.reads == 1  # the second request was answered from the cache

        auth.forget_identities()
        db.change_during_read = auth.forget_identities
        await auth.authenticate(**ask)
        db.change_during_read = None
        await auth.authenticate(**ask)
        assert db.reads == 3  # the read overtaken by a change was not cached: the next one asked again
    finally:
        await auth.aclose()


async def _true(value: bool) -> bool:
    return value
