"""rules.narrowing: §6.2 rules and §13 cases 90, 91, 92 (the pure part)."""

from datetime import datetime, timedelta, timezone
from typing import Any

from rules.constraints import normalize_constraints
from rules.narrowing import check_narrowing

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)


def parent(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scopes": ["read", "write"],
        "expires_at": T0 + timedelta(hours=1),
        "resource_id": None,
        "constraints": {"max_hops": 3},
    }
    base.update(overrides)
    return base


def child(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scopes": ["read"],
        "requested_expires_at": None,
        "resource_id": None,
        "resolved_resource_ids": [],
        "resolved_identifiers": [],
        "constraints": {"max_hops": 1, "ttl_seconds": 60},
        "ttl_seconds": None,
    }
    base.update(overrides)
    return base


def test_baseline_allowed() -> None:
    assert check_narrowing(parent(), child())


def test_case_90_default_parent_constraints_block_onward_delegation() -> None:
    default_parent = parent(constraints={"ttl_seconds": 600})  # max_hops absent -> 1
    assert not check_narrowing(default_parent, child(constraints={"ttl_seconds": 60}))
    assert not check_narrowing(parent(constraints={}), child(constraints={}))
    assert not check_narrowing(parent(constraints={"max_hops": 1}), child(constraints={"max_hops": 1}))


def test_case_91_resources_and_hops() -> None:
    p = parent(constraints={"resources": ["calendar"], "max_hops": 2})
    bad = child(
        resolved_resource_ids=["res-files"],
        resolved_identifiers=["files"],
        constraints=normalize_constraints(constraints={"resources": ["files"], "max_hops": 1}, body_ttl_seconds=60),
    )
    assert not check_narrowing(p, bad)
    good = child(
        scopes=["read"],
        resolved_resource_ids=["res-cal"],
        resolved_identifiers=["calendar"],
        constraints=normalize_constraints(constraints={"resources": ["calendar"], "max_hops": 1}, body_ttl_seconds=60),
    )
    assert check_narrowing(p, good)


def test_case_92_explicit_expiry_later_than_parent() -> None:
    p = parent()
    assert not check_narrowing(p, child(requested_expires_at=p["expires_at"] + timedelta(microseconds=1)))
    assert check_narrowing(p, child(requested_expires_at=p["expires_at"]))
    assert check_narrowing(p, child(requested_expires_at=p["expires_at"] - timedelta(seconds=1)))


def test_rule_1_scopes_subset() -> None:
    assert check_narrowing(parent(), child(scopes=[]))
    assert check_narrowing(parent(), child(scopes=["read", "write"]))
    assert not check_narrowing(parent(), child(scopes=["read", "admin"]))
    assert not check_narrowing(parent(scopes=[]), child(scopes=["read"]))


def test_rule_3_parent_resource_id() -> None:
    p = parent(resource_id="res-1")
    assert check_narrowing(p, child(resource_id="res-1", resolved_resource_ids=["res-1"]))
    assert check_narrowing(p, child(resource_id=None, resolved_resource_ids=["res-1"]))
    assert not check_narrowing(p, child())  # broad child under a resource-bound parent
    assert not check_narrowing(p, child(resource_id="res-2", resolved_resource_ids=["res-2"]))
    assert not check_narrowing(p, child(resource_id=None, resolved_resource_ids=["res-1", "res-2"]))


def test_rule_3_parent_resource_id_wins_over_constraint_resources() -> None:
    p = parent(resource_id="res-1", constraints={"max_hops": 3, "resources": ["calendar"]})
    # Only the row id is compared when the parent has one.
    assert check_narrowing(p, child(resource_id="res-1", resolved_resource_ids=["res-1"], resolved_identifiers=["x"]))


def test_rule_3_parent_constraint_resources_compare_identifiers() -> None:
    p = parent(constraints={"max_hops": 3, "resources": ["calendar", "ledger"]})
    assert check_narrowing(p, child(resolved_resource_ids=["r1", "r2"], resolved_identifiers=["calendar", "ledger"]))
    assert not check_narrowing(p, child(resolved_resource_ids=["r3"], resolved_identifiers=["files"]))
    assert not check_narrowing(p, child())


def test_rule_3_broad_parent_allows_anything() -> None:
    assert check_narrowing(parent(), child(resource_id="res-9", resolved_resource_ids=["res-9"],
                                           resolved_identifiers=["x"]))


def test_rule_4_hops() -> None:
    p = parent(constraints={"max_hops": 3})
    assert check_narrowing(p, child(constraints={"max_hops": 2, "ttl_seconds": 5}))
    assert not check_narrowing(p, child(constraints={"max_hops": 3, "ttl_seconds": 5}))
    assert check_narrowing(p, child(constraints={"ttl_seconds": 5}))  # child default 1
    # Parent max_depth alone counts as max_hops.
    assert check_narrowing(parent(constraints={"max_depth": 2}), child(constraints={"max_hops": 1}))


def test_rule_5_ttl() -> None:
    p = parent(constraints={"max_hops": 3, "ttl_seconds": 60})
    assert check_narrowing(p, child(constraints={"ttl_seconds": 60}))
    assert not check_narrowing(p, child(constraints={"ttl_seconds": 61}))
    assert not check_narrowing(p, child(constraints={}, requested_expires_at=T0))
    assert check_narrowing(p, child(constraints={}, ttl_seconds=30))  # body ttl counts
    assert check_narrowing(parent(), child(constraints={}))  # parent without ttl


def test_rule_6_budget() -> None:
    p = parent(constraints={"max_hops": 3, "budget": 2})
    assert check_narrowing(p, child(scopes=["read", "write"]))  # 2 scopes spend 2
    assert not check_narrowing(p, child(scopes=["read", "write"], constraints={"budget": 3}))
    assert check_narrowing(p, child(scopes=["read"], constraints={"budget": 2}))
    p1 = parent(constraints={"max_hops": 3, "budget": 1})
    assert not check_narrowing(p1, child(scopes=["read", "write"]))
    assert check_narrowing(p1, child(scopes=["read", "write"], constraints={"budget": 1}))


def test_unparseable_parent_constraints_refuse() -> None:
    assert not check_narrowing(parent(constraints={"max_hops": 3, "legacy": 1}), child())
    assert not check_narrowing(parent(constraints=None), child())
    assert not check_narrowing(parent(constraints={"max_hops": 30}), child())
