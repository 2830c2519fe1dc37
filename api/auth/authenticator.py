"""The §3.1 bearer middleware, independent of the web framework (the app calls `authenticate`), and
signature verification of mandates for /v1/verify (§4.25.1)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
import jwt

from api.auth.bearer import InvalidToken, bearer_token, non_empty_str, optional_id, scope_set, unverified
from rules.identity import Identity, operator_identity
from api.auth.jwks import JwksCache, JwksError
from api.auth.mandate import VERIFY_REQUIRED, mandate_claims
from api.auth.routes import OPERATOR_GLOBAL, OPERATOR_ONLY_PATHS, PUBLIC_PATHS, operator_route_zone, path_only
from rules.errors import CoordinatorError
from storage.db import ChannelListener
from rules.ids import is_valid_id
from storage import directory

log = logging.getLogger("coordinator.auth")

CLOCK_TOLERANCE_SECONDS: Final = 60

# Changes to applications and authority records are notified here (migration 0004's triggers).
DIRECTORY_CHANNEL: Final = "coordinator_directory"
IDENTITY_CACHE_SIZE: Final = 16384


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
        # Identities found live, until when (epoch seconds): trusted only while the directory listener
        # is connected, which empties the cache on every change (any API process's, any writer's).
        self._live: collections.OrderedDict[tuple[str, str, str | None], float] = collections.OrderedDict()
        self._live_seconds: float = getattr(settings, "IDENTITY_CACHE_SECONDS", 0)
        self._directory: ChannelListener | None = None
        self._directory_task: asyncio.Task[None] | None = None
        # Counts directory changes: an answer read before a change is not cached after it.
        self._directory_changes = 0
        self._directory_warned = False

    async def aclose(self) -> None:
        if self._directory_task is not None:
            self._directory_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._directory_task
        await self.jwks.aclose()

    def forget_identities(self) -> None:
        """The directory changed: check every identity against Postgres again."""
        self._directory_changes += 1
        self._live.clear()

    # -- §3.1 ------------------------------------------------------------------------------------

    async def authenticate(self, *, method: str, path: str, authorization: str | None,
                           route_zone_id: str | None) -> Identity | None:
        """The caller's identity, None for public paths; raises CoordinatorError (401/403)."""
        path = path_only(path)
        if path in PUBLIC_PATHS:  # step 1
            return None
        token = bearer_token(authorization)  # step 2
        if self._is_operator_token(token):  # step 3
            target = operator_route_zone(method, path)
            if target == OPERATOR_GLOBAL:
                return operator_identity("", self._scope)
            if target is not None:
                return operator_identity(target, self._scope)
        if path in OPERATOR_ONLY_PATHS:  # step 4
            raise CoordinatorError(403, "operator_token_required")
        try:
            claims = await self._verified_claims(token)  # steps 5-7
        except InvalidToken as exc:
            log.info("bearer rejected: %s", exc)
            raise CoordinatorError(401, "invalid_token") from None
        zone_id: str = claims["zone_id"]
        scopes = scope_set(claims.get("scope"))
        if self._scope not in scopes:  # step 8
            raise CoordinatorError(403, "missing_scope")
        if route_zone_id is not None and route_zone_id != zone_id:  # step 9
            raise CoordinatorError(403, "zone_mismatch")
        client_id = claims.get("client_id")
        if not non_empty_str(client_id):  # step 10
            raise CoordinatorError(401, "invalid_token")
        sid = optional_id(claims.get("sid"))
        if not await self._identity_live(zone_id, client_id, sid):  # step 11
            raise CoordinatorError(401, "identity_revoked")
        return Identity(  # step 12
            zone_id=zone_id,
            scopes=scopes,
            subject=claims["sub"],
            client_id=client_id,
            session_id=optional_id(claims.get("agent_session_id")),
            delegation_edge_id=optional_id(claims.get("delegation_edge_id")),
            authority_record_id=sid,
        )

    def _is_operator_token(self, token: str) -> bool:
        # compare_digest: no timing signal about how much of the operator token matched.
        return bool(self._operator_token) and hmac.compare_digest(token.encode("utf-8"), self._operator_token)

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        cached = await self._recently_verified(token)
        if cached is not None:
            return cached
        header, payload = unverified(token)
        zone_id = payload.get("zone_id")
        if not is_valid_id(zone_id):  # step 5: never fetch keys for a zone id we would not accept
            raise InvalidToken("zone_id claim missing or malformed")
        claims, key = await self._verify_signature(token, header, zone_id)  # step 6
        if claims.get("zone_id") != zone_id:  # step 7
            raise InvalidToken("zone_id changed")
        if not non_empty_str(claims.get("sub")):
            raise InvalidToken("sub missing")
        if claims.get("use") != "session":  # sdk-wire-contract §7.2: only session mandates
            raise InvalidToken("use is not session")
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
            raise InvalidToken("alg is not ES256")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("kid is not a string")
        try:
            keys = await self.jwks.keys_for(zone_id, kid)
        except JwksError as exc:
            raise InvalidToken(str(exc)) from exc
        failure: Exception | None = None
        for key in keys:
            try:
                return jwt.decode(token, key, algorithms=["ES256"], issuer=self._issuer, audience=self._issuer,
                                  leeway=CLOCK_TOLERANCE_SECONDS, options={"require": list(required)}), key
            except jwt.InvalidSignatureError as exc:
                failure = exc  # another key of the set may have signed it
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise InvalidToken(exc.__class__.__name__) from exc
        raise InvalidToken(failure.__class__.__name__ if failure else "no key")

    async def _identity_live(self, zone_id: str, client_id: str, sid: str | None) -> bool:
        key = (zone_id, client_id, sid)
        now = time.time()
        if self._caching():
            until = self._live.get(key)
            if until is not None and until > now:
                return True
        changes = self._directory_changes
        row = await directory.identity_live_until(self.db, zone_id, client_id, sid)
        if row is None or row["application_until"] is None or row["authority_record_until"] is None:
            self._live.pop(key, None)
            return False
        if self._caching() and changes == self._directory_changes:
            self._live[key] = min(now + self._live_seconds, row["application_until"], row["authority_record_until"])
            self._live.move_to_end(key)
            while len(self._live) > IDENTITY_CACHE_SIZE:
                self._live.popitem(last=False)
        return True

    def _caching(self) -> bool:
        """Whether cached identities may answer: the cache is on and its listener is connected."""
        if self._live_seconds <= 0 or not hasattr(self.db, "url"):
            return False
        if self._directory_task is None:
            self._directory = ChannelListener(self.db.url, DIRECTORY_CHANNEL,
                                              on_notify=lambda _: self.forget_identities(),
                                              on_connect=self._directory_connected, on_lost=self._directory_lost)
            self._directory_task = asyncio.get_running_loop().create_task(self._directory.run(),
                                                                          name="directory-listener")
        return self._directory is not None and self._directory.listening

    def _directory_connected(self) -> None:
        self._directory_warned = False
        self.forget_identities()  # changes made while nobody listened were missed

    def _directory_lost(self, exc: Exception) -> None:
        self.forget_identities()
        if not self._directory_warned:  # once per outage, not at every reconnect attempt
            self._directory_warned = True
            log.warning("directory listener lost (%s: %s): identities are checked on every request until it is "
                        "back", type(exc).__name__, exc)

    # -- §4.25.1 (/v1/verify) ----------------------------------------------------------------------

    async def verify_mandate(self, token: str, zone_id: str, required_scope: str | None = None,
                             require_agent: bool = False, require_delegation: bool = False) -> dict[str, Any]:
        """Claims of a valid mandate for `zone_id`, camelCase as /v1/verify answers them (§4.25);
        any failure raises CoordinatorError(401, "token_invalid") and the reason is only logged."""
        try:
            if not is_valid_id(zone_id):
                raise InvalidToken("zone_id is not an id")
            header, _ = unverified(token)
            claims, _ = await self._verify_signature(token, header, zone_id, required=VERIFY_REQUIRED)
            return mandate_claims(claims, zone_id, required_scope, require_agent, require_delegation)
        except InvalidToken as exc:
            log.info("/v1/verify rejected a token: %s", exc)
            raise CoordinatorError(401, "token_invalid") from None

