"""rules.authority: §6.1 fold, §13 cases 100 and 101."""

from datetime import datetime, timezone
from typing import Any

from rules.authority import fold_effective_authority

UTC = timezone.utc


def edge(edge_id: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": edge_id,
        "scopes": ["read"],
        "resource_id": None,
        "resource_identifier": None,
        "constraints_json": {},
        "expires_at": datetime(2026, 6, 1, tzinfo=UTC),
    }
    base.update(overrides)
    return base


def test_case_100_no_inbound_edges() -> None:
    out = fold_effective_authority("s1", [])
    assert out == {
        "agent_session_id": "s1",
        "inbound_edges": [],
        "effective_scopes": [],
        "effective_resources": [],
        "effective_max_hops": 0,
        "effective_ttl_seconds": None,
        "earliest_expires_at": None,
    }
    assert list(out) == [
        "agent_session_id",
        "inbound_edges",
        "effective_scopes",
        "effective_resources",
        "effective_max_hops",
        "effective_ttl_seconds",
        "earliest_expires_at",
    ]


def test_case_101_two_parents() -> None:
    p1 = edge(
        "p1",
        scopes=["read", "write"],
        resource_id="res-1",
        resource_identifier="urn:a",
        constraints_json={"max_hops": 3, "ttl_seconds": 600, "resources": ["urn:x"]},
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
    )
    p2 = edge(
        "p2",
        scopes=["read"],
        constraints_json={"max_hops": 2, "ttl_seconds": 300},
        expires_at=datetime(2026, 6, 1, tzinfo=UTC),
    )
    out = fold_effective_authority("s1", [p1, p2])
    assert out == {
        "agent_session_id": "s1",
        "inbound_edges": ["p1", "p2"],
        "effective_scopes": ["read"],
        "effective_resource_ids": ["res-1"],
        "effective_resources": ["urn:a", "urn:x"],
        "effective_resource_constrained": True,
        "effective_max_hops": 2,
        "effective_ttl_seconds": 300,
        "earliest_expires_at": "2026-06-01T00:00:00.000Z",
    }
    assert list(out) == [
        "agent_session_id",
        "inbound_edges",
        "effective_scopes",
        "effective_resource_ids",
        "effective_resources",
        "effective_resource_constrained",
        "effective_max_hops",
        "effective_ttl_seconds",
        "earliest_expires_at",
    ]


def test_single_default_edge() -> None:
    out = fold_effective_authority("s", [edge("e1", scopes=["b", "a", "a"])])
    assert out["effective_scopes"] == ["a", "b"]
    assert out["effective_resource_ids"] == []
    assert out["effective_resources"] == []
    assert out["effective_resource_constrained"] is False
    assert out["effective_max_hops"] == 1
    assert out["effective_ttl_seconds"] is None


def test_identifier_alone_does_not_constrain() -> None:
    # A joined identifier without a resource_id cannot occur in practice, but the flag only
    # follows resource_id and constraints.resources.
    out = fold_effective_authority("s", [edge("e1", resource_identifier="urn:a")])
    assert out["effective_resources"] == ["urn:a"]
    assert out["effective_resource_constrained"] is False


def test_unparseable_edges_are_listed_but_skipped() -> None:
    bad = edge("bad", scopes=["x"], constraints_json={"legacy": 1}, expires_at=datetime(2025, 1, 1, tzinfo=UTC))
    good = edge("good", scopes=["read"], constraints_json={"max_hops": 4}, expires_at=datetime(2026, 1, 1, tzinfo=UTC))
    out = fold_effective_authority("s", [good, bad])
    assert out["inbound_edges"] == ["good", "bad"]
    assert out["effective_scopes"] == ["read"]
    assert out["effective_max_hops"] == 4
    # A skipped non-first edge does not lower the earliest expiry ...
    assert out["earliest_expires_at"] == "2026-01-01T00:00:00.000Z"
    # ... but a skipped first edge seeds it.
    out = fold_effective_authority("s", [bad, good])
    assert out["earliest_expires_at"] == "2025-01-01T00:00:00.000Z"
    assert out["effective_scopes"] == ["read"]


def test_all_unparseable() -> None:
    bad = edge("bad", constraints_json={"budget": 0})
    out = fold_effective_authority("s", [bad])
    assert out["inbound_edges"] == ["bad"]
    assert out["effective_scopes"] == []
    assert out["effective_max_hops"] is None
    assert out["effective_ttl_seconds"] is None
    assert out["effective_resource_constrained"] is False
    assert out["earliest_expires_at"] == "2026-06-01T00:00:00.000Z"


def test_scope_intersection_empty_and_utf16_sort() -> None:
    a = edge("a", scopes=["\uffff", "\U0001F600", "z"])
    b = edge("b", scopes=["\uffff", "\U0001F600"])
    out = fold_effective_authority("s", [a, b])
    assert out["effective_scopes"] == ["\U0001F600", "\uffff"]
    c = edge("c", scopes=["other"])
    assert fold_effective_authority("s", [a, c])["effective_scopes"] == []


def test_max_depth_only_counts_as_hops_and_ttl_min() -> None:
    out = fold_effective_authority(
        "s",
        [
            edge("a", constraints_json={"max_depth": 5, "ttl_seconds": 100}),
            edge("b", constraints_json={"max_hops": 7}),
        ],
    )
    assert out["effective_max_hops"] == 5
    assert out["effective_ttl_seconds"] == 100


def test_earliest_truncates_to_milliseconds() -> None:
    out = fold_effective_authority("s", [edge("a", expires_at=datetime(2026, 6, 1, 0, 0, 0, 123999, tzinfo=UTC))])
    assert out["earliest_expires_at"] == "2026-06-01T00:00:00.123Z"
