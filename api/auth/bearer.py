"""The bearer token: the Authorization header (§3.1 step 2), the JWT read without its signature
(only to pick the zone and key), and the shape of claim values."""

from __future__ import annotations

from typing import Any, Final, TypeGuard

import jwt

from rules.errors import CoordinatorError

MAX_BEARER_CHARS: Final = 4096


class InvalidToken(Exception):
    """Internal: the token is unusable; the reason is only logged (§3.1 step 6)."""


def bearer_token(authorization: str | None) -> str:
    # Exact, case-sensitive "Bearer " prefix; empty or over-long tokens count as missing (step 2).
    if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
        raise CoordinatorError(401, "missing_token")
    token = authorization[len("Bearer "):].strip()
    if not token or len(token) > MAX_BEARER_CHARS:
        raise CoordinatorError(401, "missing_token")
    return token


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, payload) without checking the signature; only used to pick the zone and key."""
    try:
        decoded = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise InvalidToken(f"malformed: {exc.__class__.__name__}") from exc
    header, payload = decoded["header"], decoded["payload"]
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InvalidToken("malformed")
    return header, payload


def non_empty_str(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""


def scope_set(value: object) -> frozenset[str]:
    return frozenset(value.split()) if isinstance(value, str) else frozenset()


def optional_id(value: object) -> str | None:
    return value if non_empty_str(value) else None
