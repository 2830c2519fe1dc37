"""Unit tests of bearer authentication (reference-behaviour §3.1, §13 cases 1-11), the JWKS cache,
/v1/verify mandate rules (§4.25.1) and the devstack key/token helpers.

The database is a fake whose `fetchrow` answers the identity query from in-memory sets; the real
SQL runs against Postgres in the integration tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The repo root is not on sys.path under `.venv/bin/pytest` (no pythonpath setting, no installed
# package); make this module importable on its own without a top-level conftest.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jwt  # noqa: E402
import pytest  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from api.auth import (  # noqa: E402
    ADMIN_SCOPE,
    OPERATOR,
    OPERATOR_GLOBAL,
    Authenticator,
    Identity,
    JwksCache,
    JwksError,
    operator_route_zone,
    split_path,
)
from devstack.keys import SigningKey, ensure_signing_key, generate_signing_key, write_jwks  # noqa: E402
from devstack.tokens import mint_token  # noqa: E402
from rules.errors import CoordinatorError  # noqa: E402
from settings import Settings, load_settings  # noqa: E402

ISSUER = "http://127.0.0.1:4000/sts"
OP_TOKEN = "operator-secret-token-0123456789"
KEY = generate_signing_key(kid="test-key-1")
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class FakeDb:
    """Answers the runtime identity query (§3.1 step 11) from sets of live rows."""

    def __init__(self) -> None:
        self.live_apps: set[tuple[str, str]] = {("z1", "app-1"), ("z2", "app-2")}
        self.live_records: set[tuple[str, str]] = {("z1", "ar-1"), ("z2", "ar-2")}
        self.calls: list[tuple[str, Any]] = []

    async def fetchrow(self, sql: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((sql, params))
        zone, sid = params["zone_id"], params["sid"]
        return {
            # Until when each stays live (epoch seconds), NULL when it is not live now.
            "application_until": math.inf if (zone, params["client_id"]) in self.live_apps else None,
            "authority_record_until": math.inf if sid is None or (zone, sid) in self.live_records else None,
        }


def make_settings(tmp_path: Path, key: SigningKey = KEY, **overrides: Any) -> Settings:
    jwks_path = write_jwks(key, tmp_path / "jwks.json")
    values: dict[str, Any] = {"ISSUER_URL": ISSUER, "JWKS_FILE": str(jwks_path), "JWKS_URL": "", "STS_URL": "",
                              "CARACAL_COORDINATOR_TOKEN": OP_TOKEN, "AGENT_COORDINATOR_SCOPE": "agent:lifecycle"}
    values.update(overrides)
    return load_settings(**values)


def token(zone: str = "z1", app: str = "app-1", sid: str | None = "ar-1", **kwargs: Any) -> str:
    kwargs.setdefault("issuer", ISSUER)
    return mint_token(kwargs.pop("key", KEY), zone_id=zone, client_id=app, sid=sid, **kwargs)


def route_zone(path: str) -> str | None:
    segments = split_path(path)
    return segments[1] if len(segments) >= 2 and segments[0] == "zones" else None


async def call(authn: Authenticator, path: str, bearer: str | None = None, *, method: str = "GET",
               authorization: str | None = None) -> Identity | None:
    header = authorization if authorization is not None else (f"Bearer {bearer}" if bearer is not None else None)
    return await authn.authenticate(method=method, path=path, authorization=header, route_zone_id=route_zone(path))


async def error_of(authn: Authenticator, path: str, bearer: str | None = None, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(CoordinatorError) as info:
        await call(authn, path, bearer, **kwargs)
    return info.value.status, info.value.code


@pytest.fixture
def db() -> FakeDb:
    return FakeDb()


@pytest.fixture
def authn(tmp_path: Path, db: FakeDb) -> Authenticator:
    return Authenticator(make_settings(tmp_path), db)


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    server: _JwksServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.server.requests.append(self.path)
        body = json.dumps(self.server.document).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _JwksServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]
    document: dict[str, Any]


@contextlib.contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[_JwksServer]:
    server = _JwksServer(("127.0.0.1", 0), _JwksHandler)
    server.requests, server.document = [], document
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def url_settings(tmp_path: Path, server: _JwksServer, **overrides: Any) -> Settings:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    overrides.setdefault("JWKS_URL", base + "/keys/{zone_id}/jwks.json")
    return make_settings(tmp_path, JWKS_FILE="", **overrides)


# ------------------------------------------------------------------------------------------------
# §13 cases 1, 2, 11: bearer parsing and public paths
# ------------------------------------------------------------------------------------------------


async def test_case1_missing_authorization(authn: Authenticator) -> None:
    assert await error_of(authn, "/zones/z1/agents") == (401, "missing_token")


@pytest.mark.parametrize("header", ["Basic x", "bearer abc", "Bearer ", "Bearer    ", "Bearer", "Token abc",
                                    "Bearer " + "a" * 4097])
async def test_case2_malformed_bearer(authn: Authenticator, header: str) -> None:
    assert await error_of(authn, "/zones/z1/agents", authorization=header) == (401, "missing_token")


async def test_case2_4096_chars_is_parsed_not_missing(authn: Authenticator) -> None:
    assert await error_of(authn, "/zones/z1/agents", "a" * 4096) == (401, "invalid_token")


async def test_bearer_is_trimmed(authn: Authenticator) -> None:
    identity = await call(authn, "/zones/z1/agents", authorization=f"Bearer   {token()}  ")
    assert identity is not None and identity.client_id == "app-1"


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/verify", "/health?x=1"])
async def test_case11_public_paths_need_no_token(authn: Authenticator, db: FakeDb, path: str) -> None:
    assert await call(authn, path) is None
    assert await call(authn, path, authorization="Basic junk") is None
    assert db.calls == []


async def test_public_path_match_is_exact(authn: Authenticator) -> None:
    assert await error_of(authn, "/health/") == (401, "missing_token")
    assert await error_of(authn, "/v1/verify/x") == (401, "missing_token")


# ------------------------------------------------------------------------------------------------
# §13 cases 3-8: mandate verification
# ------------------------------------------------------------------------------------------------


async def test_valid_token_gives_identity(authn: Authenticator, db: FakeDb) -> None:
    bearer = token(scopes=["agent:lifecycle", "coordinator.spawn_for:app-9"],
                   extra={"agent_session_id": "s-1", "delegation_edge_id": "e-1"})
    identity = await call(authn, "/zones/z1/agents", bearer)
    assert identity == Identity(zone_id="z1", scopes=frozenset({"agent:lifecycle", "coordinator.spawn_for:app-9"}),
                                subject="app-1", client_id="app-1", session_id="s-1", delegation_edge_id="e-1",
                                authority_record_id="ar-1", operator=False)
    assert len(db.calls) == 1
    assert db.calls[0][1] == {"zone_id": "z1", "client_id": "app-1", "sid": "ar-1"}


async def test_route_without_zone_param_skips_zone_check(authn: Authenticator) -> None:
    identity = await authn.authenticate(method="POST", path="/v1/begin", authorization=f"Bearer {token()}",
                                        route_zone_id=None)
    assert identity is not None and identity.zone_id == "z1"


@pytest.mark.parametrize("zone", ["../z1", "z 1", "", "z/1", "a" * 129, 7, None])
async def test_case3_bad_zone_claim_rejected_without_jwks_request(tmp_path: Path, db: FakeDb, zone: Any) -> None:
    with jwks_server(KEY.jwks) as server:
        authn = Authenticator(url_settings(tmp_path, server), db)
        bearer = token(extra={"zone_id": zone})  # None removes the claim
        assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")
        await authn.aclose()
        assert server.requests == []
    assert authn.jwks.fetch_count == 0


@pytest.mark.parametrize("bearer", ["not-a-jwt", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30.", OP_TOKEN + "x"])
async def test_garbage_bearer_is_invalid_token(authn: Authenticator, bearer: str) -> None:
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")


async def test_case4_rs256_token_rejected(authn: Authenticator) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": [ISSUER], "sub": "app-1", "iat": now, "exp": now + 900, "jti": "j",
              "zone_id": "z1", "client_id": "app-1", "scope": "agent:lifecycle", "sid": "ar-1", "root_sid": "ar-1",
              "use": "session", "sub_type": "application"}
    bearer = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": KEY.kid})
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")


async def test_case4_hs256_with_public_key_material_rejected(authn: Authenticator) -> None:
    # Algorithm confusion: an HMAC "signed" with the published JWK must not pass.
    # (built by hand: PyJWT itself refuses to HMAC with JWK-looking secrets)
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KEY.kid}).encode())
    payload = b64(json.dumps({"zone_id": "z1", "iss": ISSUER, "aud": [ISSUER], "sub": "app-1", "iat": now,
                              "exp": now + 60, "client_id": "app-1", "scope": "agent:lifecycle",
                              "use": "session"}).encode())
    secret = json.dumps(KEY.public_jwk).encode()
    signature = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    bearer = f"{header}.{payload}.{signature}"
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")


@pytest.mark.parametrize("extra", [
    {"iss": "http://evil.example/sts"},
    {"iss": None},
    {"aud": ["http://other.example"]},
    {"aud": None},
    {"nbf": int(time.time()) + 3600},
])
async def test_case4_wrong_claims_rejected(authn: Authenticator, extra: dict[str, Any]) -> None:
    assert await error_of(authn, "/zones/z1/agents", token(extra=extra)) == (401, "invalid_token")


async def test_case4_aud_as_string_accepted(authn: Authenticator) -> None:
    assert await call(authn, "/zones/z1/agents", token(extra={"aud": ISSUER})) is not None


async def test_case4_other_key_and_unknown_kid_rejected(authn: Authenticator) -> None:
    other = generate_signing_key(kid=KEY.kid)  # same kid, different key: signature fails
    assert await error_of(authn, "/zones/z1/agents", token(key=other)) == (401, "invalid_token")
    stranger = generate_signing_key(kid="unknown-kid")
    assert await error_of(authn, "/zones/z1/agents", token(key=stranger)) == (401, "invalid_token")


async def test_token_without_kid_tries_every_key(tmp_path: Path, db: FakeDb) -> None:
    other = generate_signing_key(kid="other")
    settings = make_settings(tmp_path)
    Path(settings.JWKS_FILE).write_text(json.dumps({"keys": [other.public_jwk, KEY.public_jwk]}))
    authn = Authenticator(settings, db)
    now = int(time.time())
    claims = jwt.decode(token(), options={"verify_signature": False})
    bearer = jwt.encode(claims | {"iat": now, "exp": now + 60}, KEY.private_key, algorithm="ES256")
    assert "kid" not in jwt.get_unverified_header(bearer)
    assert await call(authn, "/zones/z1/agents", bearer) is not None


async def test_case4_expiry_boundary(authn: Authenticator) -> None:
    now = int(time.time())
    expired_30s = token(now=now - 930, ttl_seconds=900)
    assert await call(authn, "/zones/z1/agents", expired_30s) is not None
    expired_65s = token(now=now - 965, ttl_seconds=900)
    assert await error_of(authn, "/zones/z1/agents", expired_65s) == (401, "invalid_token")


async def test_use_must_be_session(authn: Authenticator) -> None:
    for use in ("resource", "gateway"):
        assert await error_of(authn, "/zones/z1/agents", token(use=use)) == (401, "invalid_token")
    assert await error_of(authn, "/zones/z1/agents", token(extra={"use": None})) == (401, "invalid_token")


@pytest.mark.parametrize("sub", [None, ""])
async def test_sub_required(authn: Authenticator, sub: str | None) -> None:
    bearer = token(extra={"sub": None}) if sub is None else token(sub=sub)
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")


@pytest.mark.parametrize("scopes", [[], ["agent:read"], ["coordinator.admin"], "agent:lifecycleX"])
async def test_case5_missing_scope(authn: Authenticator, db: FakeDb, scopes: Any) -> None:
    assert await error_of(authn, "/zones/z1/agents", token(scopes=scopes)) == (403, "missing_scope")
    assert db.calls == []


async def test_case6_zone_mismatch(authn: Authenticator, db: FakeDb) -> None:
    assert await error_of(authn, "/zones/z2/agents", token()) == (403, "zone_mismatch")
    assert db.calls == []


async def test_order_missing_scope_before_zone_mismatch(authn: Authenticator) -> None:
    assert await error_of(authn, "/zones/z2/agents", token(scopes=[])) == (403, "missing_scope")


@pytest.mark.parametrize("client_id", [None, ""])
async def test_case7_client_id_required(authn: Authenticator, db: FakeDb, client_id: str | None) -> None:
    bearer = token(sub="app-1", extra={"client_id": client_id} if client_id == "" else {"client_id": None})
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")
    # step 9 (zone) comes before step 10 (client_id)
    assert await error_of(authn, "/zones/z2/agents", bearer) == (403, "zone_mismatch")
    assert db.calls == []


async def test_case8_archived_application(authn: Authenticator, db: FakeDb) -> None:
    db.live_apps.discard(("z1", "app-1"))
    assert await error_of(authn, "/zones/z1/agents", token()) == (401, "identity_revoked")


async def test_case8_application_of_another_zone(authn: Authenticator) -> None:
    assert await error_of(authn, "/zones/z1/agents", token(app="app-2", sid=None)) == (401, "identity_revoked")


async def test_case8_revoked_authority_record(authn: Authenticator, db: FakeDb) -> None:
    db.live_records.discard(("z1", "ar-1"))
    assert await error_of(authn, "/zones/z1/agents", token()) == (401, "identity_revoked")
    assert await error_of(authn, "/zones/z1/agents", token(sid="ar-2")) == (401, "identity_revoked")


@pytest.mark.parametrize("sid", [None, ""])
async def test_absent_or_empty_sid_checks_application_only(authn: Authenticator, db: FakeDb, sid: str | None) -> None:
    identity = await call(authn, "/zones/z1/agents", token(sid=sid))
    assert identity is not None and identity.authority_record_id is None
    assert db.calls[-1][1]["sid"] is None


async def test_identity_check_is_one_round_trip(authn: Authenticator, db: FakeDb) -> None:
    await call(authn, "/zones/z1/agents", token())
    sql = db.calls[0][0]
    assert len(db.calls) == 1
    assert "applications" in sql and "authority_records" in sql
    assert "archived_at IS NULL" in sql and "status = 'active'" in sql


async def test_jwks_file_reloaded_when_it_changes(tmp_path: Path, db: FakeDb) -> None:
    settings = make_settings(tmp_path)
    authn = Authenticator(settings, db)
    assert await call(authn, "/zones/z1/agents", token()) is not None
    rotated = generate_signing_key(kid="test-key-2")
    write_jwks(rotated, settings.JWKS_FILE)
    os.utime(settings.JWKS_FILE, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert await call(authn, "/zones/z1/agents", token(key=rotated)) is not None
    assert await error_of(authn, "/zones/z1/agents", token()) == (401, "invalid_token")


async def test_a_repeated_token_skips_the_signature_check_until_its_key_leaves_the_set(
        tmp_path: Path, db: FakeDb, monkeypatch) -> None:
    settings = make_settings(tmp_path)
    authn = Authenticator(settings, db)
    bearer = token()
    decodes = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: decodes.append(1) or real_decode(*a, **kw))
    assert await call(authn, "/zones/z1/agents", bearer) is not None
    assert await call(authn, "/zones/z1/agents", bearer) is not None
    assert len(decodes) == 1 and len(db.calls) == 2  # the identity is still checked on every request
    write_jwks(generate_signing_key(kid="test-key-2"), settings.JWKS_FILE)
    os.utime(settings.JWKS_FILE, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert await error_of(authn, "/zones/z1/agents", bearer) == (401, "invalid_token")


async def test_missing_jwks_file_fails_closed(tmp_path: Path, db: FakeDb) -> None:
    authn = Authenticator(make_settings(tmp_path, JWKS_FILE=str(tmp_path / "nope.json")), db)
    assert await error_of(authn, "/zones/z1/agents", token()) == (401, "invalid_token")


# ------------------------------------------------------------------------------------------------
# §13 cases 9, 10: operator token
# ------------------------------------------------------------------------------------------------

OPERATOR_ALLOWED = [
    ("GET", "/zones/z1/agents"),
    ("GET", "/zones/z1/agents/a1"),
    ("GET", "/zones/z1/agents/a1/children"),
    ("GET", "/zones/z1/agents/a1/effective-authority"),
    ("PATCH", "/zones/z1/agents/a1/suspend"),
    ("PATCH", "/zones/z1/agents/a1/resume"),
    ("DELETE", "/zones/z1/agents/a1"),
    ("GET", "/zones/z1/delegations/active"),
    ("GET", "/zones/z1/delegations/inbound/s1"),
    ("GET", "/zones/z1/delegations/outbound/s1"),
    ("GET", "/zones/z1/delegations/e1/traverse"),
    ("GET", "/zones/z1/delegations/e1/impact"),
    ("PATCH", "/zones/z1/delegations/e1/revoke"),
    ("GET", "/zones/z1/agent-services"),
    ("GET", "/zones/z1/invocations"),
    ("PUT", "/zones/z1/applications/app-1"),
    ("GET", "/zones/z1/applications/app-1"),
    ("POST", "/zones/z1/applications/app-1/archive"),
    ("PUT", "/zones/z1/resources/r1"),
    ("GET", "/zones/z1/resources/r1"),
    ("POST", "/zones/z1/resources/r1/archive"),
    ("PUT", "/zones/z1/authority-records/ar-1"),
    ("GET", "/zones/z1/authority-records/ar-1"),
    ("POST", "/zones/z1/authority-records/ar-1/revoke"),
    ("GET", "/zones/z1/delegations/inbound/s1/e1"),
    ("GET", "/zones/z1/events"),
    ("GET", "/zones/z1/agents?limit=5"),
]

OPERATOR_REFUSED = [
    ("GET", "/zones/z1/invocations/i1"),
    ("POST", "/zones/z1/invocations"),
    ("PATCH", "/zones/z1/invocations/i1/start"),
    ("POST", "/zones/z1/agents"),
    ("POST", "/zones/z1/agents/a1/heartbeat"),
    ("POST", "/zones/z1/agent-services"),
    ("POST", "/zones/z1/delegations"),
    ("GET", "/zones/z1/agent-services/x1"),
    ("POST", "/v1/begin"),
    ("POST", "/v1/end"),
    ("GET", "/zones/z!1/agents"),
    ("GET", "/zones/z%2F1/agents"),
    ("GET", "/zones/z1/agents/a%2F1"),
    ("GET", "/zones//agents"),
    ("GET", "/zones/z1/agents/"),
    ("PATCH", "/zones/z1/agents/a1/terminate"),
    ("GET", "/zones/z1/agents/a1/suspend"),
    ("DELETE", "/zones/z1/agents"),
    ("GET", "/zones/z1/applications"),
    ("DELETE", "/zones/z1/applications/app-1"),
    ("GET", "/zones/" + "z" * 129 + "/agents"),
]


@pytest.mark.parametrize(("method", "path"), OPERATOR_ALLOWED)
async def test_case9_operator_allowed_routes(authn: Authenticator, db: FakeDb, method: str, path: str) -> None:
    identity = await call(authn, path, OP_TOKEN, method=method)
    assert identity == Identity(zone_id="z1", scopes=frozenset({"agent:lifecycle", ADMIN_SCOPE}), subject=OPERATOR,
                                client_id=OPERATOR, operator=True)
    assert identity.authority_record_id is None
    assert db.calls == []


@pytest.mark.parametrize(("method", "path"), OPERATOR_REFUSED)
async def test_case9_operator_token_elsewhere_is_invalid_token(authn: Authenticator, method: str, path: str) -> None:
    assert await error_of(authn, path, OP_TOKEN, method=method) == (401, "invalid_token")


@pytest.mark.parametrize("path", ["/stats", "/metrics", "/stats?x=1"])
async def test_case9_operator_on_stats_and_metrics(authn: Authenticator, path: str) -> None:
    identity = await call(authn, path, OP_TOKEN)
    assert identity is not None and identity.operator and identity.zone_id == ""
    assert identity.client_id == OPERATOR and ADMIN_SCOPE in identity.scopes


async def test_operator_token_compared_exactly(authn: Authenticator) -> None:
    assert await error_of(authn, "/zones/z1/agents", OP_TOKEN[:-1]) == (401, "invalid_token")
    assert await error_of(authn, "/stats", OP_TOKEN.upper()) == (403, "operator_token_required")


async def test_operator_disabled_when_not_configured(tmp_path: Path, db: FakeDb) -> None:
    authn = Authenticator(make_settings(tmp_path, CARACAL_COORDINATOR_TOKEN=""), db)
    assert await error_of(authn, "/zones/z1/agents", OP_TOKEN) == (401, "invalid_token")
    assert await error_of(authn, "/stats", OP_TOKEN) == (403, "operator_token_required")


@pytest.mark.parametrize("path", ["/stats", "/metrics"])
async def test_case10_non_operator_bearer_on_stats(authn: Authenticator, db: FakeDb, path: str) -> None:
    assert await error_of(authn, path, token()) == (403, "operator_token_required")
    assert await error_of(authn, path, "junk") == (403, "operator_token_required")
    assert await error_of(authn, path) == (401, "missing_token")
    assert db.calls == []


def test_operator_route_zone_and_split_path() -> None:
    assert operator_route_zone("GET", "/metrics") == OPERATOR_GLOBAL
    assert operator_route_zone("get", "/zones/zone-a:1/agents") == "zone-a:1"
    assert operator_route_zone("GET", b"/zones/z1/agents") == "z1"
    assert operator_route_zone("POST", "/zones/z1/agents") is None
    assert operator_route_zone("GET", "/zones/z%2F1/agents") is None
    assert split_path("/zones/z%2F1/agents") == ["zones", "z/1", "agents"]
    assert split_path(b"/zones/z1/a%20b?x=1") == ["zones", "z1", "a b"]


# ------------------------------------------------------------------------------------------------
# JWKS over HTTP (JWKS_URL / STS_URL): templating, caching, cooldown, LRU
# ------------------------------------------------------------------------------------------------


async def test_jwks_url_is_templated_per_zone_and_cached(tmp_path: Path, db: FakeDb) -> None:
    with jwks_server(KEY.jwks) as server:
        authn = Authenticator(url_settings(tmp_path, server), db)
        try:
            assert await call(authn, "/zones/z1/agents", token()) is not None
            assert await call(authn, "/zones/z1/agents/a1", token()) is not None
            assert server.requests == ["/keys/z1/jwks.json"]
            assert await call(authn, "/zones/z2/agents", token(zone="z2", app="app-2", sid="ar-2")) is not None
            assert await call(authn, "/zones/z2/agents", token(zone="z2", app="app-2", sid="ar-2")) is not None
            assert server.requests == ["/keys/z1/jwks.json", "/keys/z2/jwks.json"]
        finally:
            await authn.aclose()


async def test_jwks_from_sts_url_with_zone_query(tmp_path: Path, db: FakeDb) -> None:
    with jwks_server(KEY.jwks) as server:
        sts = f"http://127.0.0.1:{server.server_address[1]}/"
        authn = Authenticator(url_settings(tmp_path, server, JWKS_URL="", STS_URL=sts), db)
        db.live_apps.add(("zone:1", "app-1"))
        try:
            identity = await call(authn, "/zones/zone:1/agents", token(zone="zone:1", sid=None))
            assert identity is not None and identity.zone_id == "zone:1"
        finally:
            await authn.aclose()
        assert server.requests == ["/.well-known/jwks.json?zone_id=zone%3A1"]


async def test_jwks_unreachable_fails_closed(tmp_path: Path, db: FakeDb) -> None:
    with jwks_server(KEY.jwks) as server:
        settings = url_settings(tmp_path, server)
    authn = Authenticator(settings, db)  # the server is gone now
    try:
        assert await error_of(authn, "/zones/z1/agents", token()) == (401, "invalid_token")
    finally:
        await authn.aclose()


async def test_no_jwks_source_fails_closed(tmp_path: Path, db: FakeDb) -> None:
    authn = Authenticator(make_settings(tmp_path, JWKS_FILE=""), db)
    assert await error_of(authn, "/zones/z1/agents", token()) == (401, "invalid_token")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_cache_cooldown_and_max_age() -> None:
    rotated = generate_signing_key(kid="rotated")
    clock = FakeClock()
    with jwks_server(KEY.jwks) as server:
        cache = JwksCache(jwks_url=f"http://127.0.0.1:{server.server_address[1]}/{{zone_id}}", clock=clock)
        try:
            assert len(await cache.keys_for("z1", KEY.kid)) == 1
            # unknown kid inside the cooldown: no refetch
            clock.now += 10
            with pytest.raises(JwksError):
                await cache.keys_for("z1", "rotated")
            assert len(server.requests) == 1
            # after the cooldown an unknown kid refetches once and finds the rotated key
            server.document = {"keys": [KEY.public_jwk, rotated.public_jwk]}
            clock.now += 25
            assert len(await cache.keys_for("z1", "rotated")) == 1
            assert len(server.requests) == 2
            with pytest.raises(JwksError):
                await cache.keys_for("z1", "never-published")
            assert len(server.requests) == 2
            # past the max age the keys are refetched before use
            clock.now += 600
            assert len(await cache.keys_for("z1", None)) == 2
            assert len(server.requests) == 3
        finally:
            await cache.aclose()
    # max age passed and the source is gone: fail closed, even for a kid we had
    clock.now += 601
    with pytest.raises(JwksError):
        await cache.keys_for("z1", KEY.kid)
    await cache.aclose()


async def test_jwks_cache_lru_bound() -> None:
    with jwks_server(KEY.jwks) as server:
        cache = JwksCache(jwks_url=f"http://127.0.0.1:{server.server_address[1]}/{{zone_id}}", max_zones=2)
        try:
            for zone in ("z1", "z2", "z1", "z3", "z1", "z2"):
                await cache.keys_for(zone, KEY.kid)
            # z1 stays hot; z2 was evicted by z3 and fetched again
            assert server.requests == ["/z1", "/z2", "/z3", "/z2"]
        finally:
            await cache.aclose()


async def test_jwks_concurrent_misses_share_one_fetch() -> None:
    import asyncio

    with jwks_server(KEY.jwks) as server:
        cache = JwksCache(jwks_url=f"http://127.0.0.1:{server.server_address[1]}/{{zone_id}}")
        try:
            results = await asyncio.gather(*(cache.keys_for("z1", KEY.kid) for _ in range(5)))
            assert all(len(keys) == 1 for keys in results)
            assert server.requests == ["/z1"]
        finally:
            await cache.aclose()


async def test_jwks_ignores_unusable_keys(tmp_path: Path, db: FakeDb) -> None:
    jwk = dict(KEY.public_jwk)
    unusable = [jwk | {"alg": "ES384"}, jwk | {"use": "enc"}, {"kty": "RSA", "kid": KEY.kid}]
    with jwks_server({"keys": unusable}) as server:
        authn = Authenticator(url_settings(tmp_path, server), db)
        try:
            assert await error_of(authn, "/zones/z1/agents", token()) == (401, "invalid_token")
        finally:
            await authn.aclose()


# ------------------------------------------------------------------------------------------------
# /v1/verify (§4.25, §4.25.1)
# ------------------------------------------------------------------------------------------------


async def verify_error(authn: Authenticator, bearer: str, zone: str = "z1", **kwargs: Any) -> None:
    with pytest.raises(CoordinatorError) as info:
        await authn.verify_mandate(bearer, zone, kwargs.get("required_scope"), kwargs.get("require_agent", False),
                                   kwargs.get("require_delegation", False))
    assert (info.value.status, info.value.code, info.value.fields) == (401, "token_invalid", {})


async def test_verify_mandate_claims(authn: Authenticator, db: FakeDb) -> None:
    bearer = token(now=1_000, ttl_seconds=10**10, scopes=["agent:lifecycle", "payments:read"], extra={
        "agent_session_id": "s-1", "delegation_edge_id": "e-1", "target": ["resource://a"], "hop_count": 2,
        "delegation_path": ["s-0", "s-1"], "delegation_graph_epoch": 4,
        "delegation_chain": [{"application_id": "app-0", "agent_session_id": "s-0"}, {"application_id": "app-1"}],
        "jti": "jti-1"})
    claims = await authn.verify_mandate(bearer, "z1", "payments:read", True, True)
    assert claims == {
        "sub": "app-1", "zoneId": "z1", "clientId": "app-1", "sid": "ar-1", "rootSid": "ar-1", "use": "session",
        "subType": "application", "jti": "jti-1", "issuedAt": 1_000, "expiresAt": 1_000 + 10**10,
        "scope": "agent:lifecycle payments:read", "targetResources": ["resource://a"], "agentSessionId": "s-1",
        "delegationEdgeId": "e-1", "delegationPath": ["s-0", "s-1"],
        "delegationChain": [{"applicationId": "app-0", "agentSessionId": "s-0"}, {"applicationId": "app-1"}],
        "graphEpoch": 4, "hopCount": 2,
    }
    assert db.calls == []  # /v1/verify is stateless


async def test_verify_mandate_minimal_and_resource_use(authn: Authenticator) -> None:
    claims = await authn.verify_mandate(token(use="resource", sub_type="user", scopes=""), "z1", None, False, False)
    assert claims["use"] == "resource" and claims["subType"] == "user" and claims["scope"] == ""
    assert set(claims) == {"sub", "zoneId", "clientId", "sid", "rootSid", "use", "subType", "jti", "issuedAt",
                           "expiresAt", "scope"}


@pytest.mark.parametrize("extra", [
    {"jti": None}, {"sid": None}, {"root_sid": None}, {"client_id": None}, {"exp": None}, {"iat": None},
    {"use": "gateway"}, {"sub_type": "robot"}, {"sub_type": None}, {"jti": ""}, {"target": ["", "x"]},
    {"target": "resource://a"}, {"hop_count": 11}, {"hop_count": -1}, {"delegation_graph_epoch": -1},
    {"delegation_chain": [{"agent_session_id": "s"}]}, {"delegation_chain": "x"}, {"scope": ["agent:lifecycle"]},
    {"zone_id": "z2"}, {"iss": "http://evil"}, {"aud": ["http://evil"]},
])
async def test_verify_mandate_rejects(authn: Authenticator, extra: dict[str, Any]) -> None:
    await verify_error(authn, token(extra=extra))


async def test_verify_mandate_requirements(authn: Authenticator) -> None:
    await verify_error(authn, token(), required_scope="payments:read")
    await verify_error(authn, token(), require_agent=True)
    await verify_error(authn, token(), require_delegation=True)
    await verify_error(authn, token(), zone="z2")
    await verify_error(authn, token(), zone="../z1")
    await verify_error(authn, token(now=int(time.time()) - 1000))
    await verify_error(authn, "garbage")
    await verify_error(authn, token(key=generate_signing_key(kid=KEY.kid)))


# ------------------------------------------------------------------------------------------------
# devstack: keys and tokens
# ------------------------------------------------------------------------------------------------


def test_ensure_signing_key_creates_once(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = ensure_signing_key(directory)
    pem = directory / "signing-key.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    jwks = json.loads((directory / "jwks.json").read_text())
    assert jwks == first.jwks and first.jwks_path == directory / "jwks.json"
    (jwk,) = jwks["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "use", "alg", "kid")} == {
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": first.kid}
    pem_bytes = pem.read_bytes()
    (directory / "jwks.json").unlink()
    second = ensure_signing_key(directory)
    assert second.kid == first.kid and second.jwks == first.jwks and pem.read_bytes() == pem_bytes
    assert json.loads((directory / "jwks.json").read_text()) == first.jwks


def test_mint_token_shape() -> None:
    bearer = mint_token(KEY, issuer=ISSUER, zone_id="z1", client_id="app-1", sid="ar-1",
                        extra={"sub_type": None, "hop_count": 1}, now=1_000)
    assert jwt.get_unverified_header(bearer) == {"alg": "ES256", "typ": "JWT", "kid": KEY.kid}
    claims = jwt.decode(bearer, KEY.private_key.public_key(), algorithms=["ES256"], audience=ISSUER,
                        options={"verify_exp": False})
    assert claims.pop("jti")
    assert claims == {"iss": ISSUER, "aud": [ISSUER], "sub": "app-1", "iat": 1_000, "exp": 1_900, "zone_id": "z1",
                      "client_id": "app-1", "scope": "agent:lifecycle", "sid": "ar-1", "root_sid": "ar-1",
                      "use": "session", "hop_count": 1}
    no_sid = jwt.decode(mint_token(KEY, issuer=ISSUER, zone_id="z1", client_id="a", sid=None),
                        options={"verify_signature": False})
    assert "sid" not in no_sid and "root_sid" not in no_sid


async def test_token_cli_mints_a_token_the_authenticator_accepts(tmp_path: Path, db: FakeDb) -> None:
    key_dir = tmp_path / "keys"
    env = {k: v for k, v in os.environ.items() if k != "ISSUER_URL"} | {"ISSUER_URL": ISSUER}
    result = subprocess.run(
        [sys.executable, "-m", "devstack.tokens", "--zone", "z1", "--app", "app-1", "--sid", "ar-1",
         "--scope", "agent:lifecycle", "--scope", "coordinator.admin", "--ttl", "120", "--key-dir", str(key_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    bearer = result.stdout.strip()
    assert bearer.count(".") == 2 and "\n" not in bearer
    settings = make_settings(tmp_path, JWKS_FILE=str(key_dir / "jwks.json"))
    identity = await call(Authenticator(settings, db), "/zones/z1/agents", bearer)
    assert identity is not None and identity.scopes == frozenset({"agent:lifecycle", "coordinator.admin"})
