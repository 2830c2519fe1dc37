"""Bearer authentication (reference-behaviour §3.1) and mandate verification for /v1/verify (§4.25.1).

`Authenticator.authenticate` runs the §3.1 steps in the reference's order, because the order is
observable: e.g. a token lacking the scope on another zone's URL answers `missing_scope`, not
`zone_mismatch`, and a token without `client_id` on another zone answers `zone_mismatch`.

Keys come from `JwksCache`: `JWKS_FILE` (reloaded when it changes), else `JWKS_URL` (may contain
`{zone_id}`), else the reference's `${STS_URL}/.well-known/jwks.json?zone_id=<zone>`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, unquote

import httpx
import jwt

from rules.errors import CoordinatorError

__all__ = [
    "ADMIN_SCOPE",
    "Authenticator",
    "Identity",
    "ID_PATTERN",
    "JwksCache",
    "JwksError",
    "OPERATOR",
    "OPERATOR_GLOBAL",
    "PUBLIC_PATHS",
    "operator_route_zone",
    "split_path",
]

log = logging.getLogger("coordinator.auth")

ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")
PUBLIC_PATHS: Final = frozenset({"/health", "/ready", "/v1/verify"})
OPERATOR_ONLY_PATHS: Final = frozenset({"/metrics", "/stats"})
OPERATOR: Final = "caracal-operator"
ADMIN_SCOPE: Final = "coordinator.admin"
# Returned by operator_route_zone for /metrics and /stats; "*" can never be a zone id.
OPERATOR_GLOBAL: Final = "*"
MAX_BEARER_CHARS: Final = 4096
CLOCK_TOLERANCE_SECONDS: Final = 60
MAX_HOP_COUNT: Final = 10


def _is_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def _non_empty_str(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The authenticated caller (§3.1 step 12). `session_id` is the token's `agent_session_id`;
    `authority_record_id` is its `sid`. Operator identities have no authority record."""

    zone_id: str
    scopes: frozenset[str]
    subject: str
    client_id: str
    session_id: str | None = None
    delegation_edge_id: str | None = None
    authority_record_id: str | None = None
    operator: bool = False


def _operator_identity(zone_id: str, coordinator_scope: str) -> Identity:
    return Identity(zone_id=zone_id, scopes=frozenset({coordinator_scope, ADMIN_SCOPE}), subject=OPERATOR,
                    client_id=OPERATOR, operator=True)


# ---------------------------------------------------------------------------------------------
# Paths and the operator allowlist (§3.1 step 3)
# ---------------------------------------------------------------------------------------------


def _path_only(raw_path: str | bytes) -> str:
    if isinstance(raw_path, bytes):
        raw_path = raw_path.decode("ascii", errors="replace")
    return raw_path.split("?", 1)[0]


def split_path(raw_path: str | bytes) -> list[str]:
    """Segments of a raw (still percent-encoded) path, each then percent-decoded.

    Splitting before decoding keeps `z%2F1` one segment (which then fails the id pattern) instead
    of letting an encoded slash change the route shape. `"/zones/z1/agents"` → `["zones", "z1", "agents"]`.
    """
    path = _path_only(raw_path)
    if path.startswith("/"):
        path = path[1:]
    return [unquote(segment, errors="replace") for segment in path.split("/")]


# Routes under /zones/:z/ the operator token may call. ":" is an id segment, "a|b" alternatives.
_OPERATOR_ZONE_ROUTES: Final[tuple[tuple[str, str], ...]] = (
    # §3.1 step 3, exactly
    ("GET", "agents"),
    ("GET", "agents/:"),
    ("GET", "agents/:/children"),
    ("GET", "agents/:/effective-authority"),
    ("PATCH", "agents/:/suspend|resume"),
    ("DELETE", "agents/:"),
    ("GET", "delegations/active"),
    ("GET", "delegations/inbound/:"),
    ("GET", "delegations/outbound/:"),
    ("GET", "delegations/:/traverse|impact"),
    ("PATCH", "delegations/:/revoke"),
    ("GET", "agent-services"),
    ("GET", "invocations"),
    # our additions (DESIGN "Directory and credentials"; events feed): operator-only routes
    ("PUT", "applications/:"),
    ("GET", "applications/:"),
    ("POST", "applications/:/archive"),
    ("PUT", "resources/:"),
    ("GET", "resources/:"),
    ("POST", "resources/:/archive"),
    ("PUT", "authority-records/:"),
    ("GET", "authority-records/:"),
    ("POST", "authority-records/:/revoke"),
    ("GET", "delegations/inbound/:/:"),
    ("GET", "events"),
)

_Pattern = tuple[frozenset[str] | None, ...]  # None = any id segment


def _compile_routes() -> dict[str, tuple[_Pattern, ...]]:
    table: dict[str, list[_Pattern]] = collections.defaultdict(list)
    for method, template in _OPERATOR_ZONE_ROUTES:
        pattern = tuple(None if part == ":" else frozenset(part.split("|")) for part in template.split("/"))
        table[method].append(pattern)
    return {method: tuple(patterns) for method, patterns in table.items()}


_OPERATOR_ROUTE_TABLE: Final = _compile_routes()


def _matches(pattern: _Pattern, segments: list[str]) -> bool:
    if len(pattern) != len(segments):
        return False
    return all(_is_id(seg) if part is None else seg in part for part, seg in zip(pattern, segments, strict=False))


def operator_route_zone(method: str, path: str | bytes) -> str | None | Literal["*"]:
    """Where the operator token is accepted (§3.1 step 3).

    `path` is the raw request path. Returns `OPERATOR_GLOBAL` ("*") for /metrics and /stats, the
    URL's zone id for an allowlisted zone route, and None otherwise (the token then goes on to JWT
    parsing and fails 401 invalid_token).
    """
    if _path_only(path) in OPERATOR_ONLY_PATHS:
        return OPERATOR_GLOBAL
    segments = split_path(path)
    if len(segments) < 3 or segments[0] != "zones" or not _is_id(segments[1]):
        return None
    rest = segments[2:]
    patterns = _OPERATOR_ROUTE_TABLE.get(method.upper(), ())
    return segments[1] if any(_matches(pattern, rest) for pattern in patterns) else None


# ---------------------------------------------------------------------------------------------
# JWKS
# ---------------------------------------------------------------------------------------------


class JwksError(Exception):
    """No usable key for a token; logged, and answered as invalid_token (fail closed)."""


_Key = tuple[str | None, jwt.PyJWK]  # (kid, key)


def parse_jwks(document: Any) -> tuple[_Key, ...]:
    """The ES256-usable keys of a JWKS document (a bare JWK is accepted too); others are skipped."""
    if isinstance(document, Mapping) and "keys" not in document and "kty" in document:
        document = {"keys": [document]}
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("JWKS document has no keys array")
    keys: list[_Key] = []
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "ES256") != "ES256":
            continue
        try:
            key = jwt.PyJWK(dict(jwk), algorithm="ES256")
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        kid = jwk.get("kid")
        keys.append((kid if isinstance(kid, str) else None, key))
    return tuple(keys)


def _select(keys: tuple[_Key, ...], kid: str | None) -> list[jwt.PyJWK]:
    # A kid in the header must match a key; without one every key is a candidate.
    return [key for key_id, key in keys if kid is None or key_id == kid]


@dataclass
class _ZoneKeys:
    keys: tuple[_Key, ...]
    fetched_at: float
    last_attempt: float  # last fetch attempt, successful or not: paces unknown-kid refetches


class JwksCache:
    """Per-zone signing keys (§3.1 step 6).

    URL sources: a zone's keys are used for at most MAX_AGE_SECONDS after the fetch (then refetched;
    fail closed if that fails); an unknown `kid` triggers at most one refetch per COOLDOWN_SECONDS;
    each fetch is capped at FETCH_TIMEOUT_SECONDS; at most `max_zones` zones are kept (LRU).
    Concurrent misses for one zone share one fetch.
    """

    MAX_AGE_SECONDS: Final = 600.0
    COOLDOWN_SECONDS: Final = 30.0
    FETCH_TIMEOUT_SECONDS: Final = 5.0
    MAX_DOCUMENT_BYTES: Final = 256 * 1024

    def __init__(self, *, jwks_file: str = "", jwks_url: str = "", sts_url: str = "", max_zones: int = 256,
                 http_client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._file = Path(jwks_file) if jwks_file else None
        self._url_template = jwks_url
        self._sts_url = sts_url
        self._max_zones = max(1, max_zones)
        self._client = http_client
        self._owns_client = http_client is None
        self._clock = clock
        self._zones: collections.OrderedDict[str, _ZoneKeys] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Task[_ZoneKeys]] = {}
        self._file_keys: tuple[tuple[int, int], tuple[_Key, ...]] | None = None
        self.fetch_count = 0  # observability for tests and metrics

    @classmethod
    def from_settings(cls, settings: Any, http_client: httpx.AsyncClient | None = None) -> JwksCache:
        return cls(jwks_file=settings.JWKS_FILE, jwks_url=settings.JWKS_URL, sts_url=settings.STS_URL,
                   max_zones=settings.JWKS_CACHE_MAX, http_client=http_client)

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- public ----------------------------------------------------------------------------------

    async def keys_for(self, zone_id: str, kid: str | None) -> list[jwt.PyJWK]:
        """Candidate verification keys for a token of `zone_id` whose header names `kid`."""
        if self._file is not None:
            candidates = _select(self._load_file(), kid)
        else:
            candidates = await self._zone_candidates(zone_id, kid)
        if not candidates:
            raise JwksError("no key matches the token's kid" if kid is not None else "JWKS has no usable key")
        return candidates

    def url_for(self, zone_id: str) -> str:
        zone = quote(zone_id, safe="")
        if self._url_template:
            return self._url_template.replace("{zone_id}", zone)
        if self._sts_url:
            return f"{self._sts_url.rstrip('/')}/.well-known/jwks.json?zone_id={zone}"
        raise JwksError("no JWKS source configured (JWKS_FILE, JWKS_URL or STS_URL)")

    # -- file source -----------------------------------------------------------------------------

    def _load_file(self) -> tuple[_Key, ...]:
        assert self._file is not None
        try:
            stat = os.stat(self._file)
        except OSError as exc:
            raise JwksError(f"JWKS_FILE unreadable: {exc.__class__.__name__}") from exc
        version = (stat.st_mtime_ns, stat.st_size)
        if self._file_keys is not None and self._file_keys[0] == version:
            return self._file_keys[1]
        try:
            keys = parse_jwks(json.loads(self._file.read_bytes()))
        except (OSError, ValueError) as exc:
            raise JwksError(f"JWKS_FILE invalid: {exc.__class__.__name__}") from exc
        self.fetch_count += 1
        self._file_keys = (version, keys)
        return keys

    # -- URL source ------------------------------------------------------------------------------

    async def _zone_candidates(self, zone_id: str, kid: str | None) -> list[jwt.PyJWK]:
        entry = self._zones.get(zone_id)
        if entry is None or self._clock() - entry.fetched_at >= self.MAX_AGE_SECONDS:
            entry = await self._refresh(zone_id)
        else:
            self._zones.move_to_end(zone_id)
        candidates = _select(entry.keys, kid)
        if not candidates and kid is not None and self._clock() - entry.last_attempt >= self.COOLDOWN_SECONDS:
            # Key rotation: the STS may have published a new kid since our fetch.
            entry = await self._refresh(zone_id)
            candidates = _select(entry.keys, kid)
        return candidates

    async def _refresh(self, zone_id: str) -> _ZoneKeys:
        task = self._inflight.get(zone_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_zone(zone_id))
            self._inflight[zone_id] = task
            task.add_done_callback(lambda done: self._fetch_done(zone_id, done))
        # shield: one caller giving up (client disconnect) must not cancel the others' fetch.
        return await asyncio.shield(task)

    def _fetch_done(self, zone_id: str, task: asyncio.Task[_ZoneKeys]) -> None:
        if self._inflight.get(zone_id) is task:
            del self._inflight[zone_id]
        if not task.cancelled():
            task.exception()  # mark retrieved even when every waiter went away

    async def _fetch_zone(self, zone_id: str) -> _ZoneKeys:
        url = self.url_for(zone_id)
        previous = self._zones.get(zone_id)
        if previous is not None:
            previous.last_attempt = self._clock()  # a failed refetch still starts the cooldown
        self.fetch_count += 1
        try:
            document = await asyncio.wait_for(self._get_json(url), self.FETCH_TIMEOUT_SECONDS)
        except (TimeoutError, httpx.HTTPError, ValueError) as exc:
            raise JwksError(f"JWKS fetch failed: {exc.__class__.__name__}") from exc
        now = self._clock()
        entry = _ZoneKeys(keys=parse_jwks(document), fetched_at=now, last_attempt=now)
        self._store(zone_id, entry)
        return entry

    def _store(self, zone_id: str, entry: _ZoneKeys) -> None:
        self._zones[zone_id] = entry
        self._zones.move_to_end(zone_id)
        while len(self._zones) > self._max_zones:
            self._zones.popitem(last=False)

    async def _get_json(self, url: str) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient()
        async with self._client.stream("GET", url, headers={"accept": "application/json"},
                                       timeout=self.FETCH_TIMEOUT_SECONDS, follow_redirects=False) as response:
            if response.status_code != 200:
                raise JwksError(f"JWKS fetch answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.MAX_DOCUMENT_BYTES:
                    raise JwksError("JWKS document too large")
        return json.loads(bytes(body))


# ---------------------------------------------------------------------------------------------
# Authenticator
# ---------------------------------------------------------------------------------------------

# One round trip for both runtime identity checks (§3.1 step 11). A NULL sid skips the record check.
_IDENTITY_SQL: Final = """
SELECT
  EXISTS (
    SELECT 1 FROM applications
     WHERE zone_id = %(zone_id)s AND id = %(client_id)s
       AND archived_at IS NULL AND (expires_at IS NULL OR expires_at > now())
  ) AS application_live,
  (%(sid)s::text IS NULL OR EXISTS (
    SELECT 1 FROM authority_records
     WHERE zone_id = %(zone_id)s AND id = %(sid)s::text
       AND status = 'active' AND expires_at > now()
  )) AS authority_record_live
"""


class _InvalidToken(Exception):
    """Internal: the token is unusable; the reason is only logged (§3.1 step 6)."""


def _bearer_token(authorization: str | None) -> str:
    # Exact, case-sensitive "Bearer " prefix; empty or over-long tokens count as missing (step 2).
    if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
        raise CoordinatorError(401, "missing_token")
    token = authorization[len("Bearer "):].strip()
    if not token or len(token) > MAX_BEARER_CHARS:
        raise CoordinatorError(401, "missing_token")
    return token


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, payload) without checking the signature; only used to pick the zone and key."""
    try:
        decoded = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise _InvalidToken(f"malformed: {exc.__class__.__name__}") from exc
    header, payload = decoded["header"], decoded["payload"]
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _InvalidToken("malformed")
    return header, payload


def _scope_set(value: object) -> frozenset[str]:
    return frozenset(value.split()) if isinstance(value, str) else frozenset()


def _optional_id(value: object) -> str | None:
    return value if _non_empty_str(value) else None  # type: ignore[return-value]


# Bearer tokens whose signature was verified, kept briefly (a client sends the same mandate many times).
VERIFIED_CACHE_SIZE = 4096
VERIFIED_CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class _Verified:
    claims: dict[str, Any]
    key: jwt.PyJWK
    zone_id: str
    kid: str | None
    until: float


class Authenticator:
    """§3.1 bearer middleware, independent of the web framework (the app calls `authenticate`)."""

    def __init__(self, settings: Any, db: Any, http_client: httpx.AsyncClient | None = None, *,
                 jwks: JwksCache | None = None) -> None:
        self.settings = settings
        self.db = db
        self.jwks = jwks or JwksCache.from_settings(settings, http_client)
        self._issuer: str = settings.ISSUER_URL
        self._scope: str = settings.AGENT_COORDINATOR_SCOPE
        self._operator_token: bytes = settings.CARACAL_COORDINATOR_TOKEN.encode("utf-8")
        self._verified: collections.OrderedDict[str, _Verified] = collections.OrderedDict()

    async def aclose(self) -> None:
        await self.jwks.aclose()

    # -- §3.1 ------------------------------------------------------------------------------------

    async def authenticate(self, *, method: str, path: str, authorization: str | None,
                           route_zone_id: str | None) -> Identity | None:
        """The caller's identity, None for public paths; raises CoordinatorError (401/403)."""
        path = _path_only(path)
        if path in PUBLIC_PATHS:  # step 1
            return None
        token = _bearer_token(authorization)  # step 2
        if self._is_operator_token(token):  # step 3
            target = operator_route_zone(method, path)
            if target == OPERATOR_GLOBAL:
                return _operator_identity("", self._scope)
            if target is not None:
                return _operator_identity(target, self._scope)
        if path in OPERATOR_ONLY_PATHS:  # step 4
            raise CoordinatorError(403, "operator_token_required")
        try:
            claims = await self._verified_claims(token)  # steps 5-7
        except _InvalidToken as exc:
            log.info("bearer rejected: %s", exc)
            raise CoordinatorError(401, "invalid_token") from None
        zone_id: str = claims["zone_id"]
        scopes = _scope_set(claims.get("scope"))
        if self._scope not in scopes:  # step 8
            raise CoordinatorError(403, "missing_scope")
        if route_zone_id is not None and route_zone_id != zone_id:  # step 9
            raise CoordinatorError(403, "zone_mismatch")
        client_id = claims.get("client_id")
        if not _non_empty_str(client_id):  # step 10
            raise CoordinatorError(401, "invalid_token")
        sid = _optional_id(claims.get("sid"))
        if not await self._identity_live(zone_id, client_id, sid):  # step 11
            raise CoordinatorError(401, "identity_revoked")
        return Identity(  # step 12
            zone_id=zone_id,
            scopes=scopes,
            subject=claims["sub"],
            client_id=client_id,
            session_id=_optional_id(claims.get("agent_session_id")),
            delegation_edge_id=_optional_id(claims.get("delegation_edge_id")),
            authority_record_id=sid,
        )

    def _is_operator_token(self, token: str) -> bool:
        # compare_digest: no timing signal about how much of the operator token matched.
        return bool(self._operator_token) and hmac.compare_digest(token.encode("utf-8"), self._operator_token)

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        cached = await self._recently_verified(token)
        if cached is not None:
            return cached
        header, unverified = _unverified(token)
        zone_id = unverified.get("zone_id")
        if not _is_id(zone_id):  # step 5: never fetch keys for a zone id we would not accept
            raise _InvalidToken("zone_id claim missing or malformed")
        claims, key = await self._verify_signature(token, header, zone_id)  # step 6
        if claims.get("zone_id") != zone_id:  # step 7
            raise _InvalidToken("zone_id changed")
        if not _non_empty_str(claims.get("sub")):
            raise _InvalidToken("sub missing")
        if claims.get("use") != "session":  # sdk-wire-contract §7.2: only session mandates
            raise _InvalidToken("use is not session")
        self._verified[token] = _Verified(claims, key, zone_id, header.get("kid"), time.time() + VERIFIED_CACHE_SECONDS)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    async def _recently_verified(self, token: str) -> dict[str, Any] | None:
        """Claims of a token verified a moment ago, while the key that verified it is still in the
        zone's key set (a rotated JWKS parses into new keys: the token is verified again) and its
        time claims still hold. Saves the ECDSA verification on a client's repeated requests."""
        entry = self._verified.get(token)
        if entry is None:
            return None
        now = time.time()
        exp, nbf = entry.claims.get("exp"), entry.claims.get("nbf")
        fresh = (now < entry.until and (exp is None or now < exp + CLOCK_TOLERANCE_SECONDS)
                 and (nbf is None or now >= nbf - CLOCK_TOLERANCE_SECONDS))
        if fresh:
            try:
                fresh = any(k is entry.key for k in await self.jwks.keys_for(entry.zone_id, entry.kid))
            except JwksError:
                fresh = False
        if not fresh:
            self._verified.pop(token, None)
            return None
        self._verified.move_to_end(token)
        return entry.claims

    async def _verify_signature(self, token: str, header: dict[str, Any], zone_id: str,
                                required: tuple[str, ...] = ()) -> tuple[dict[str, Any], jwt.PyJWK]:
        """ES256 signature plus iss/aud/exp/nbf/iat (60 s leeway) against the zone's keys: the
        claims and the key that verified them."""
        if header.get("alg") != "ES256":  # checked again by PyJWT; saves a pointless key fetch
            raise _InvalidToken("alg is not ES256")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _InvalidToken("kid is not a string")
        try:
            keys = await self.jwks.keys_for(zone_id, kid)
        except JwksError as exc:
            raise _InvalidToken(str(exc)) from exc
        failure: Exception | None = None
        for key in keys:
            try:
                return jwt.decode(token, key, algorithms=["ES256"], issuer=self._issuer, audience=self._issuer,
                                  leeway=CLOCK_TOLERANCE_SECONDS, options={"require": list(required)}), key
            except jwt.InvalidSignatureError as exc:
                failure = exc  # another key of the set may have signed it
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise _InvalidToken(exc.__class__.__name__) from exc
        raise _InvalidToken(failure.__class__.__name__ if failure else "no key")

    async def _identity_live(self, zone_id: str, client_id: str, sid: str | None) -> bool:
        row = await self.db.fetchrow(_IDENTITY_SQL, {"zone_id": zone_id, "client_id": client_id, "sid": sid})
        return bool(row and row["application_live"] and row["authority_record_live"])

    # -- §4.25.1 (/v1/verify) ----------------------------------------------------------------------

    async def verify_mandate(self, token: str, zone_id: str, required_scope: str | None = None,
                             require_agent: bool = False, require_delegation: bool = False) -> dict[str, Any]:
        """Claims of a valid mandate for `zone_id`, camelCase as /v1/verify answers them (§4.25);
        any failure raises CoordinatorError(401, "token_invalid") and the reason is only logged."""
        try:
            if not _is_id(zone_id):
                raise _InvalidToken("zone_id is not an id")
            header, _ = _unverified(token)
            claims, _ = await self._verify_signature(token, header, zone_id, required=_VERIFY_REQUIRED)
            return _verify_route_claims(claims, zone_id, required_scope, require_agent, require_delegation)
        except _InvalidToken as exc:
            log.info("/v1/verify rejected a token: %s", exc)
            raise CoordinatorError(401, "token_invalid") from None


# ---------------------------------------------------------------------------------------------
# /v1/verify claim rules (§4.25.1)
# ---------------------------------------------------------------------------------------------

_VERIFY_REQUIRED: Final = ("exp", "iat", "jti", "sub", "client_id", "sid", "root_sid", "use", "sub_type")
_STRING_CLAIMS: Final = ("jti", "sub", "client_id", "sid", "root_sid", "use", "sub_type")
_OPTIONAL_IDS: Final = (("agent_session_id", "agentSessionId"), ("delegation_edge_id", "delegationEdgeId"),
                        ("source_session_id", "sourceSessionId"), ("target_session_id", "targetSessionId"))


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise _InvalidToken(reason)


def _check_verify_claims(claims: Mapping[str, Any], zone_id: str) -> None:
    for name in _STRING_CLAIMS:
        _require(_non_empty_str(claims.get(name)), f"{name} must be a non-empty string")
    _require(claims["use"] in ("session", "resource"), "use must be session or resource")
    _require(claims["sub_type"] in ("user", "application"), "sub_type must be user or application")
    _require(_non_negative_int(claims.get("iat")) and _non_negative_int(claims.get("exp")),
             "iat/exp must be non-negative integers")
    _require(isinstance(claims.get("scope") or "", str), "scope must be a string")
    _require(claims.get("zone_id") == zone_id, "zone_invalid")
    target = claims.get("target")
    _require(target is None or (isinstance(target, list) and all(_non_empty_str(t) for t in target)),
             "target must be an array of non-empty strings")
    hop_count = claims.get("hop_count")
    _require(hop_count is None or (_non_negative_int(hop_count) and hop_count <= MAX_HOP_COUNT),
             "hop_count invalid or too large")
    epoch = claims.get("delegation_graph_epoch")
    _require(epoch is None or _non_negative_int(epoch), "delegation_graph_epoch must be a non-negative integer")
    chain = claims.get("delegation_chain")
    _require(chain is None or (isinstance(chain, list) and all(
        isinstance(hop, Mapping) and _non_empty_str(hop.get("application_id")) for hop in chain)),
        "delegation_chain entries need an application_id")
    path = claims.get("delegation_path")
    _require(path is None or (isinstance(path, list) and all(isinstance(p, str) for p in path)),
             "delegation_path must be an array of strings")


def _chain_hop(hop: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"applicationId": hop["application_id"]}
    if _non_empty_str(hop.get("agent_session_id")):
        out["agentSessionId"] = hop["agent_session_id"]
    if _non_empty_str(hop.get("delegation_edge_id")):
        out["delegationEdgeId"] = hop["delegation_edge_id"]
    return out


def _verify_route_claims(claims: Mapping[str, Any], zone_id: str, required_scope: str | None,
                         require_agent: bool, require_delegation: bool) -> dict[str, Any]:
    _check_verify_claims(claims, zone_id)
    scope: str = claims.get("scope") or ""
    _require(not required_scope or required_scope in scope.split(), "required scope missing")
    _require(not require_agent or _non_empty_str(claims.get("agent_session_id")), "agent required")
    _require(not require_delegation or _non_empty_str(claims.get("delegation_edge_id")), "delegation required")
    out: dict[str, Any] = {
        "sub": claims["sub"], "zoneId": claims["zone_id"], "clientId": claims["client_id"],
        "sid": claims["sid"], "rootSid": claims["root_sid"], "use": claims["use"], "subType": claims["sub_type"],
        "jti": claims["jti"], "issuedAt": claims["iat"], "expiresAt": claims["exp"], "scope": scope,
    }
    if claims.get("target") is not None:
        out["targetResources"] = list(claims["target"])
    for claim, field in _OPTIONAL_IDS:
        if _non_empty_str(claims.get(claim)):
            out[field] = claims[claim]
    if claims.get("delegation_path") is not None:
        out["delegationPath"] = list(claims["delegation_path"])
    if claims.get("delegation_chain") is not None:
        out["delegationChain"] = [_chain_hop(hop) for hop in claims["delegation_chain"]]
    if claims.get("delegation_graph_epoch") is not None:
        out["graphEpoch"] = claims["delegation_graph_epoch"]
    if claims.get("hop_count") is not None:
        out["hopCount"] = claims["hop_count"]
    return out
