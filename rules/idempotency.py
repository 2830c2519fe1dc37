"""Idempotency key format and digests (§7)."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from rules.canonical_json import canonical_json
from rules.errors import CoordinatorError
from rules.jscompat import js_trim, js_utf8

KEY_NAMESPACE = b"caracal:coordinator:idempotency:v1"
MAX_KEY_BYTES = 255

_CONTROL = re.compile("[\x00-\x1f\x7f]")

MSG_MULTIPLE = "Idempotency-Key must be supplied exactly once"
MSG_BLANK = "Idempotency-Key must be non-empty and must not contain surrounding whitespace"
MSG_FORMAT = (
    f"Idempotency-Key must be at most {MAX_KEY_BYTES} UTF-8 bytes and contain no control characters"
)


def _invalid(message: str) -> CoordinatorError:
    # request_id is filled in by the HTTP layer; the key keeps the body's field order stable.
    return CoordinatorError(400, "idempotency_key_invalid", message=message, request_id=None)


def validate_idempotency_key(key: str) -> str:
    """Return `key` unchanged (keys are opaque) or raise 400 idempotency_key_invalid."""
    if not isinstance(key, str) or key == "" or js_trim(key) != key:
        raise _invalid(MSG_BLANK)
    if len(js_utf8(key)) > MAX_KEY_BYTES or _CONTROL.search(key):
        raise _invalid(MSG_FORMAT)
    return key


def parse_idempotency_key(values: list[str]) -> str | None:
    """All values of the `Idempotency-Key` header -> the key, or None when absent."""
    if not values:
        return None
    if len(values) > 1:
        raise CoordinatorError(400, "idempotency_key_multiple", message=MSG_MULTIPLE, request_id=None)
    return validate_idempotency_key(values[0])


def key_digest(key: str, hmac_key: bytes) -> bytes:
    """HMAC-SHA256 stored instead of the plaintext key (32 bytes)."""
    return hmac.new(hmac_key, KEY_NAMESPACE + b"\x00" + js_utf8(key), hashlib.sha256).digest()


def request_digest(obj: Any) -> bytes:
    """SHA-256 of the canonical JSON of an operation's request object."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).digest()
