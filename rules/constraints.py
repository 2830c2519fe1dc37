"""Typed delegation constraints (§6.3).

Reproduces the reference's strict zod schema: known keys are checked in table order and the first
failing one names the error (`invalid_<key>`); unknown keys are reported only after every known key
passed (zod adds the unrecognized-keys issue last), as `invalid_delegation_constraint`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from rules.errors import CoordinatorError
from rules.jscompat import utf16_len
from rules.timefmt import parse_iso_z


class _Missing:
    """Marks an absent body field (JSON null is a value, and an invalid one here)."""

    _instance: "_Missing | None" = None

    def __new__(cls) -> "_Missing":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

MAX_RESOURCES = 64
MAX_HOPS = 10  # MAX_DEPTH
MAX_TTL_SECONDS = 86400
MAX_BUDGET = 1024
MAX_BROAD_REASON = 256
BROAD_REASON_DEFAULT = "resource_null_delegation"

_MAX_SAFE_INTEGER = 2**53 - 1


def _error(code: str) -> CoordinatorError:
    return CoordinatorError(400, code)


def _as_int(value: Any, lo: int, hi: int) -> int | None:
    """zod `z.number().int().min(lo).max(hi)`; JSON 2.0 is the JS number 2, so it counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    if not isinstance(value, int) or abs(value) > _MAX_SAFE_INTEGER:
        return None
    return value if lo <= value <= hi else None


def _resources(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) and utf16_len(v) >= 1 for v in value):
        return None
    return list(value) if len(value) <= MAX_RESOURCES else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _expires_at(value: Any) -> str | None:
    # zod's datetime rule, plus: year 0000 (regex-valid, not a Python datetime) is refused so
    # that every stored expires_at can later be parsed.
    if not isinstance(value, str):
        return None
    try:
        parse_iso_z(value)
    except ValueError:
        return None
    return value


def _broad_reason(value: Any) -> str | None:
    if isinstance(value, str) and 1 <= utf16_len(value) <= MAX_BROAD_REASON:
        return value
    return None


# Table order of §6.3: the first failing key names the error. Each validator returns the
# normalized value or None (no valid value is None).
_FIELDS: list[tuple[str, Callable[[Any], Any]]] = [
    ("resources", _resources),
    ("max_depth", lambda v: _as_int(v, 1, MAX_HOPS)),
    ("max_hops", lambda v: _as_int(v, 1, MAX_HOPS)),
    ("ttl_seconds", lambda v: _as_int(v, 1, MAX_TTL_SECONDS)),
    ("budget", lambda v: _as_int(v, 1, MAX_BUDGET)),
    ("policy_approved", _bool),
    ("expires_at", _expires_at),
    ("broad_reason", _broad_reason),
]
_KNOWN = frozenset(name for name, _ in _FIELDS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_constraints(
    constraints_json: Any = MISSING,
    constraints: Any = MISSING,
    body_ttl_seconds: int | None = None,
) -> dict[str, Any]:
    """Merge, default and strictly validate the two constraint inputs of a delegation body."""
    for given in (constraints_json, constraints):
        if given is not MISSING and not isinstance(given, dict):
            raise _error("invalid_delegation_constraint")
    merged: dict[str, Any] = {}
    if constraints_json is not MISSING:
        merged.update(constraints_json)
    if constraints is not MISSING:
        merged.update(constraints)
    # SDK callers send max_depth; the graph rules read max_hops.
    if _is_number(merged.get("max_depth")) and "max_hops" not in merged:
        merged["max_hops"] = merged["max_depth"]
    if body_ttl_seconds is not None and "ttl_seconds" not in merged:
        merged["ttl_seconds"] = body_ttl_seconds

    out: dict[str, Any] = {}
    for name, validate in _FIELDS:
        if name not in merged:
            continue
        value = validate(merged[name])
        if value is None:
            raise _error(f"invalid_{name}")
        out[name] = value
    if any(key not in _KNOWN for key in merged):
        raise _error("invalid_delegation_constraint")
    if "max_depth" in out and "max_hops" in out and out["max_depth"] != out["max_hops"]:
        raise _error("invalid_max_hops")
    return out


def apply_broad_defaults(constraints: dict[str, Any]) -> dict[str, Any]:
    """Constraints stored for a resource-less (broad) delegation."""
    out = dict(constraints)
    out.setdefault("broad_reason", BROAD_REASON_DEFAULT)
    out["policy_approved"] = True
    return out


def parse_stored_constraints(value: Any) -> dict[str, Any] | None:
    """Strict re-parse of a stored constraints_json; None when it would not validate today."""
    try:
        return normalize_constraints(value)
    except CoordinatorError:
        return None
