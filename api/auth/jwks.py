"""Per-zone signing keys (§3.1 step 6): `JWKS_FILE` (reloaded when it changes), else `JWKS_URL`
(may contain `{zone_id}`), else the reference's `${STS_URL}/.well-known/jwks.json?zone_id=<zone>`."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import jwt

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

