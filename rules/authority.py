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


# Why an inbound edge of the session adds nothing to its effective authority (explain=true).
EXPIRED = "expired"
REVOKED = "revoked"
SOURCE_ENDED = "source_terminated"  # revoked when its source session ended
CONSTRAINT_INVALID = "constraint_invalid"  # its stored constraints no longer validate: the fold skips it
NARROWED_OUT = "narrowed_out"  # counted, but the intersection with the other edges left it no scope or resource


def explain_effective_authority(answer: dict[str, Any], candidates: list[dict[str, Any]],
                                parents_of: dict[str, str | None], at: datetime) -> dict[str, Any]:
    """The reasons behind `answer` (the fold of the live edges among `candidates`).

    candidates: every edge targeting the session that existed at `at`, in id order, each as for
      the fold plus {"status" (then), "status_reason", "source_session_id", "source_status" (then),
      "parent_edge_id"};
    parents_of: edge id → its parent edge id, for the candidates and their ancestors.
    For every effective scope and resource, the chains (root edge first) of the edges granting it;
    for every candidate whether it contributes and, if not, why."""
    live = set(answer["inbound_edges"])
    scopes = set(answer["effective_scopes"])
    resources = set(answer.get("effective_resources") or []) | set(answer.get("effective_resource_ids") or [])
    grants_scopes: dict[str, list[list[str]]] = {s: [] for s in answer["effective_scopes"]}
    grants_resources: dict[str, list[list[str]]] = {r: [] for r in sorted(resources)}
    edges = []
    for edge in candidates:
        chain = _chain(edge["id"], parents_of)
        parsed = parse_stored_constraints(edge.get("constraints_json"))
        named = ({edge["resource_id"], edge.get("resource_identifier")} - {None}
                 | set((parsed or {}).get("resources") or []))
        reason = _dropped_reason(edge, live, parsed, scopes, named & resources)
        if reason is None:
            for scope in set(edge.get("scopes") or []) & scopes:
                grants_scopes[scope].append(chain)
            for resource in named & resources:
                grants_resources[resource].append(chain)
        edges.append({"edge_id": edge["id"], "contributes": reason is None, "reason": reason,
                      "status": edge["status"], "status_reason": edge.get("status_reason"),
                      "expires_at": iso_ms(edge["expires_at"]), "source_session_id": edge["source_session_id"],
                      "source_status": edge.get("source_status"), "scopes": list(edge.get("scopes") or []),
                      "chain": chain})
    return {"as_of": iso_ms(at), "scopes": grants_scopes, "resources": grants_resources, "edges": edges}


def _dropped_reason(edge: dict[str, Any], live: set[str], parsed: dict[str, Any] | None, scopes: set[str],
                    resources: set[Any]) -> str | None:
    if edge["id"] not in live:
        if edge["status"] == "revoked":
            ended = (edge.get("status_reason") or "").startswith("endpoint ended")
            return SOURCE_ENDED if ended and edge.get("source_status") in ("terminated", "expired") else REVOKED
        return EXPIRED
    if parsed is None:
        return CONSTRAINT_INVALID
    if not (set(edge.get("scopes") or []) & scopes) and not resources:
        return NARROWED_OUT
    return None


def _chain(edge_id: str, parents_of: dict[str, str | None]) -> list[str]:
    """The edge's chain of parent edges, root first (a cycle, impossible by construction, stops it)."""
    chain = [edge_id]
    while (parent := parents_of.get(chain[-1])) is not None and parent not in chain:
        chain.append(parent)
    return chain[::-1]
