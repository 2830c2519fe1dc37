"""Effective authority of a session: fold of its live inbound edges (§6.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rules.constraints import parse_stored_constraints
from rules.jscompat import js_sorted
from rules.timefmt import iso_ms


def fold_effective_authority(session_id: str, parents: list[dict[str, Any]]) -> dict[str, Any]:
    """parents: live edges targeting the session, in DB order, each
    {"id", "scopes", "resource_id", "resource_identifier", "constraints_json", "expires_at"}.
    """
    if not parents:
        return {
            "agent_session_id": session_id,
            "inbound_edges": [],
            "effective_scopes": [],
            "effective_resources": [],
            "effective_max_hops": 0,
            "effective_ttl_seconds": None,
            "earliest_expires_at": None,
        }

    inbound: list[str] = []
    scopes: set[str] | None = None
    resource_ids: set[str] = set()
    identifiers: set[str] = set()
    constrained = False
    max_hops: int | None = None
    ttl: int | None = None
    # Seeded from the first edge even when its constraints do not parse; later edges only count
    # once parsed (reference behaviour).
    earliest: datetime = parents[0]["expires_at"]

    for edge in parents:
        inbound.append(edge["id"])
        c = parse_stored_constraints(edge.get("constraints_json"))
        if c is None:
            continue
        edge_scopes = set(edge.get("scopes") or [])
        scopes = edge_scopes if scopes is None else scopes & edge_scopes
        if edge.get("resource_id"):
            resource_ids.add(edge["resource_id"])
            constrained = True
        if edge.get("resource_identifier"):
            identifiers.add(edge["resource_identifier"])
        if c.get("resources"):
            identifiers.update(c["resources"])
            constrained = True
        hops = c.get("max_hops", 1)
        max_hops = hops if max_hops is None else min(max_hops, hops)
        if "ttl_seconds" in c:
            ttl = c["ttl_seconds"] if ttl is None else min(ttl, c["ttl_seconds"])
        if edge["expires_at"] < earliest:
            earliest = edge["expires_at"]

    return {
        "agent_session_id": session_id,
        "inbound_edges": inbound,
        "effective_scopes": js_sorted(scopes or set()),
        "effective_resource_ids": js_sorted(resource_ids),
        "effective_resources": js_sorted(identifiers),
        "effective_resource_constrained": constrained,
        "effective_max_hops": max_hops,
        "effective_ttl_seconds": ttl,
        "earliest_expires_at": iso_ms(earliest),
    }
