"""Paths and the operator allowlist (§3.1 steps 1, 3 and 4)."""

from __future__ import annotations

import collections
from typing import Final, Literal
from urllib.parse import unquote

from rules.ids import is_valid_id

# The inspector's page (`/ui`, its config and its assets under /ui/assets/, api/routes/ui.py) is
# public too: it holds no data and calls the API with the operator token it asks for.
PUBLIC_PATHS: Final = frozenset({"/health", "/ready", "/v1/verify", "/ui", "/ui/config.json"})
OPERATOR_ONLY_PATHS: Final = frozenset({"/metrics", "/stats"})
# Returned by operator_route_zone for /metrics and /stats; "*" can never be a zone id.
OPERATOR_GLOBAL: Final = "*"


def path_only(raw_path: str | bytes) -> str:
    if isinstance(raw_path, bytes):
        raw_path = raw_path.decode("ascii", errors="replace")
    return raw_path.split("?", 1)[0]


def split_path(raw_path: str | bytes) -> list[str]:
    """Segments of a raw (still percent-encoded) path, each then percent-decoded.

    Splitting before decoding keeps `z%2F1` one segment (which then fails the id pattern) instead
    of letting an encoded slash change the route shape. `"/zones/z1/agents"` → `["zones", "z1", "agents"]`.
    """
    path = path_only(raw_path)
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
    ("GET", "history/window"),
    ("POST", "delegations/bulk-revoke"),
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
    return all(is_valid_id(seg) if part is None else seg in part for part, seg in zip(pattern, segments, strict=False))


def operator_route_zone(method: str, path: str | bytes) -> str | None | Literal["*"]:
    """Where the operator token is accepted (§3.1 step 3).

    `path` is the raw request path. Returns `OPERATOR_GLOBAL` ("*") for /metrics and /stats, the
    URL's zone id for an allowlisted zone route, and None otherwise (the token then goes on to JWT
    parsing and fails 401 invalid_token).
    """
    if path_only(path) in OPERATOR_ONLY_PATHS:
        return OPERATOR_GLOBAL
    segments = split_path(path)
    if len(segments) < 3 or segments[0] != "zones" or not is_valid_id(segments[1]):
        return None
    rest = segments[2:]
    patterns = _OPERATOR_ROUTE_TABLE.get(method.upper(), ())
    return segments[1] if any(_matches(pattern, rest) for pattern in patterns) else None
