"""Parent narrowing: may a child edge be issued under a chosen parent edge? (§6.2)"""

from __future__ import annotations

from typing import Any

from rules.constraints import parse_stored_constraints


def check_narrowing(parent: dict[str, Any], child: dict[str, Any]) -> bool:
    """True when the child edge stays within the parent edge's authority.

    parent: {"scopes", "expires_at": datetime, "resource_id": str|None,
             "constraints": raw stored constraints_json}
    child:  {"scopes", "requested_expires_at": datetime|None, "resource_id": canonical str|None,
             "resolved_resource_ids": [...], "resolved_identifiers": [...],
             "constraints": normalized dict, "ttl_seconds": body ttl or None}
    """
    parent_c = parse_stored_constraints(parent.get("constraints"))
    if parent_c is None:
        return False
    child_c: dict[str, Any] = child.get("constraints") or {}
    child_scopes: list[str] = list(child.get("scopes") or [])

    # 1. scopes may only shrink.
    if not set(child_scopes) <= set(parent.get("scopes") or []):
        return False

    # 2. an explicit expiry may not outlive the parent (a ttl-derived one is checked at insert).
    requested = child.get("requested_expires_at")
    if requested is not None and requested > parent["expires_at"]:
        return False

    # 3. resources.
    if not _resources_narrow(parent, parent_c, child):
        return False

    # 4. hops: the parent must allow onward delegation and the child must use one hop less.
    parent_hops = parent_c.get("max_hops", 1)
    child_hops = child_c.get("max_hops", 1)
    if parent_hops <= 1 or child_hops > parent_hops - 1:
        return False

    # 5. a ttl-bounded parent needs a ttl-bounded child that is no longer.
    if "ttl_seconds" in parent_c:
        child_ttl = child_c.get("ttl_seconds", child.get("ttl_seconds"))
        if child_ttl is None or child_ttl > parent_c["ttl_seconds"]:
            return False

    # 6. budget; an unbudgeted child spends one unit per scope.
    if "budget" in parent_c:
        child_budget = child_c.get("budget", len(child_scopes))
        if child_budget > parent_c["budget"]:
            return False

    return True


def _resources_narrow(parent: dict[str, Any], parent_c: dict[str, Any], child: dict[str, Any]) -> bool:
    parent_resource = parent.get("resource_id")
    if parent_resource:
        if child.get("resource_id") == parent_resource:
            return True
        ids = list(child.get("resolved_resource_ids") or [])
        return len(ids) > 0 and all(rid == parent_resource for rid in ids)
    parent_identifiers = set(parent_c.get("resources") or [])
    if parent_identifiers:
        identifiers = list(child.get("resolved_identifiers") or [])
        return len(identifiers) > 0 and all(i in parent_identifiers for i in identifiers)
    return True  # broad parent
