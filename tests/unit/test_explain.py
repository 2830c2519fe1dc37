"""The explain rule (rules.authority.explain_effective_authority) on hand-made edges."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rules.authority import explain_effective_authority, fold_effective_authority
from rules.timefmt import parse_rfc3339

AT = datetime(2026, 12, 1, 3, 12, tzinfo=timezone.utc)
LATER = AT + timedelta(hours=1)


def edge(edge_id: str, scopes: list[str], *, status: str = "active", expires_at: datetime = LATER,
         constraints: object = None, **extra: object) -> dict:
    return {"id": edge_id, "scopes": scopes, "resource_id": "res-1", "resource_identifier": "urn:a",
            "constraints_json": {"max_hops": 1} if constraints is None else constraints, "expires_at": expires_at,
            "status": status, "status_reason": extra.pop("status_reason", status), "source_session_id": "src",
            "source_status": extra.pop("source_status", "active"), "parent_edge_id": None, **extra}


def explain(candidates: list[dict], parents: dict[str, str | None]) -> dict:
    live = [c for c in candidates if c["status"] == "active" and c["expires_at"] > AT]
    answer = fold_effective_authority("s", live)
    return explain_effective_authority(answer, candidates, parents, AT)


def test_chains_root_first_and_the_reason_of_each_dropped_edge() -> None:
    out = explain([edge("e2", ["read"]),
                   edge("e3", ["read"], status="revoked", status_reason="revoked with the cascade of e0"),
                   edge("e4", ["read"], expires_at=AT - timedelta(seconds=1)),
                   edge("e5", ["read"], status="revoked", status_reason="endpoint ended: requested",
                        source_status="terminated"),
                   edge("e6", ["read"], constraints={"max_hops": "many"})],
                  {"e2": "e1", "e1": None})
    assert out["scopes"] == {"read": [["e1", "e2"]]}
    assert out["resources"] == {"res-1": [["e1", "e2"]], "urn:a": [["e1", "e2"]]}
    assert [(e["edge_id"], e["reason"]) for e in out["edges"]] == [
        ("e2", None), ("e3", "revoked"), ("e4", "expired"), ("e5", "source_terminated"),
        ("e6", "constraint_invalid")]


def test_an_edge_the_intersection_leaves_nothing_is_narrowed_out() -> None:
    a, b = edge("a", ["read"]), edge("b", ["write"])
    a["resource_id"] = b["resource_id"] = a["resource_identifier"] = b["resource_identifier"] = None
    out = explain([a, b], {})
    assert [(e["edge_id"], e["contributes"], e["reason"]) for e in out["edges"]] == [
        ("a", False, "narrowed_out"), ("b", False, "narrowed_out")]


@pytest.mark.parametrize("text", ["2026-12-01T03:12:00Z", "2026-12-01T03:12:00.123+01:00", "2026-12-01 03:12:00Z"])
def test_rfc3339_instants(text: str) -> None:
    assert parse_rfc3339(text).tzinfo is not None


@pytest.mark.parametrize("value", ["2026-12-01", "2026-12-01T03:12:00", "yesterday", 0.5, None, "1700000000"])
def test_not_rfc3339_instants(value: object) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(value)
