"""rules.constraints: §6.3 normalisation, §13 cases 81 and 89."""

from typing import Any

import pytest

from rules.constraints import (
    MISSING,
    apply_broad_defaults,
    normalize_constraints,
    parse_stored_constraints,
)
from rules.errors import CoordinatorError


def code_of(**kwargs: Any) -> str:
    with pytest.raises(CoordinatorError) as info:
        normalize_constraints(**kwargs)
    assert info.value.status == 400
    assert info.value.body == {"error": info.value.code}
    return info.value.code


def test_nothing_given_is_empty() -> None:
    assert normalize_constraints() == {}
    assert normalize_constraints(MISSING, MISSING, None) == {}


def test_case_89_sdk_shape() -> None:
    out = normalize_constraints(constraints={"resources": ["calendar"], "max_depth": 2}, body_ttl_seconds=30)
    assert out == {"resources": ["calendar"], "max_depth": 2, "max_hops": 2, "ttl_seconds": 30}


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"constraints": {"arbitrary": True}}, "invalid_delegation_constraint"),
        ({"constraints": {"max_hops": 11}}, "invalid_max_hops"),
        ({"constraints": {"max_depth": 2, "max_hops": 3}}, "invalid_max_hops"),
        ({"constraints": {"budget": 0}}, "invalid_budget"),
        ({"constraints": ["resources"]}, "invalid_delegation_constraint"),
        ({"constraints_json": []}, "invalid_delegation_constraint"),
    ],
)
def test_case_81(kwargs: dict[str, Any], code: str) -> None:
    assert code_of(**kwargs) == code


@pytest.mark.parametrize("bad", [None, "x", 1, True, [], [{"a": 1}]])
def test_inputs_must_be_plain_objects(bad: Any) -> None:
    assert code_of(constraints_json=bad) == "invalid_delegation_constraint"
    assert code_of(constraints=bad) == "invalid_delegation_constraint"


def test_merge_constraints_override_constraints_json() -> None:
    out = normalize_constraints(
        constraints_json={"max_hops": 3, "budget": 5, "policy_approved": False},
        constraints={"max_hops": 2},
    )
    assert out == {"max_hops": 2, "budget": 5, "policy_approved": False}


def test_max_depth_copied_only_when_max_hops_absent() -> None:
    assert normalize_constraints(constraints={"max_depth": 4}) == {"max_depth": 4, "max_hops": 4}
    assert normalize_constraints(constraints={"max_depth": 4, "max_hops": 4}) == {"max_depth": 4, "max_hops": 4}
    # Non-number max_depth is not copied; it fails on its own key.
    assert code_of(constraints={"max_depth": "4"}) == "invalid_max_depth"
    # max_depth copied from constraints_json while max_hops comes from constraints.
    assert code_of(constraints_json={"max_depth": 4}, constraints={"max_hops": 2}) == "invalid_max_hops"


def test_body_ttl_copied_only_when_absent() -> None:
    assert normalize_constraints(body_ttl_seconds=60) == {"ttl_seconds": 60}
    assert normalize_constraints(constraints={"ttl_seconds": 10}, body_ttl_seconds=60) == {"ttl_seconds": 10}


def test_all_keys_valid() -> None:
    body = {
        "resources": ["calendar", "ledger"],
        "max_depth": 10,
        "max_hops": 10,
        "ttl_seconds": 86400,
        "budget": 1024,
        "policy_approved": True,
        "expires_at": "2027-01-01T00:00:00.000Z",
        "broad_reason": "r" * 256,
    }
    assert normalize_constraints(constraints=body) == body


def test_output_is_a_new_dict() -> None:
    given = {"budget": 3}
    out = normalize_constraints(constraints=given)
    out["budget"] = 4
    assert given == {"budget": 3}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("resources", "calendar"),
        ("resources", [""]),
        ("resources", ["ok", 1]),
        ("resources", ["r"] * 65),
        ("resources", None),
        ("max_depth", 0),
        ("max_depth", 11),
        ("max_depth", 1.5),
        ("max_depth", True),
        ("max_hops", 0),
        ("max_hops", "2"),
        ("max_hops", None),
        ("ttl_seconds", 0),
        ("ttl_seconds", 86401),
        ("ttl_seconds", float("nan")),
        ("ttl_seconds", float("inf")),
        ("budget", 1025),
        ("budget", -1),
        ("policy_approved", "true"),
        ("policy_approved", 1),
        ("expires_at", "2027-01-01T00:00:00+00:00"),
        ("expires_at", "2027-01-01"),
        ("expires_at", 1700000000),
        ("broad_reason", ""),
        ("broad_reason", "r" * 257),
        ("broad_reason", "\U0001F600" * 129),  # 258 UTF-16 units
        ("broad_reason", 5),
    ],
)
def test_invalid_value_names_its_key(key: str, value: Any) -> None:
    assert code_of(constraints={key: value}) == f"invalid_{key}"


def test_bounds_accepted() -> None:
    assert normalize_constraints(constraints={"resources": []}) == {"resources": []}
    assert normalize_constraints(constraints={"resources": ["r"] * 64})["resources"] == ["r"] * 64
    assert normalize_constraints(constraints={"ttl_seconds": 1, "budget": 1}) == {"ttl_seconds": 1, "budget": 1}
    assert normalize_constraints(constraints={"broad_reason": "\U0001F600" * 128}) == {
        "broad_reason": "\U0001F600" * 128
    }


def test_integral_floats_count_as_ints_and_are_normalised() -> None:
    out = normalize_constraints(constraints={"max_hops": 2.0, "budget": 7.0})
    assert out == {"max_hops": 2, "budget": 7}
    assert type(out["max_hops"]) is int and type(out["budget"]) is int
    out = normalize_constraints(constraints={"max_depth": 3.0})
    assert out == {"max_depth": 3, "max_hops": 3}
    assert type(out["max_hops"]) is int


def test_first_failing_key_in_table_order() -> None:
    # budget precedes policy_approved; ttl_seconds precedes budget; resources first of all.
    assert code_of(constraints={"policy_approved": "x", "budget": 0}) == "invalid_budget"
    assert code_of(constraints={"budget": 0, "ttl_seconds": 0}) == "invalid_ttl_seconds"
    assert code_of(constraints={"broad_reason": "", "resources": "x"}) == "invalid_resources"
    assert code_of(constraints={"expires_at": "bad", "broad_reason": ""}) == "invalid_expires_at"
    assert code_of(constraints={"max_hops": 0, "max_depth": 0}) == "invalid_max_depth"


def test_unknown_keys_reported_after_known_keys() -> None:
    assert code_of(constraints={"arbitrary": 1, "budget": 0}) == "invalid_budget"
    assert code_of(constraints={"arbitrary": 1, "budget": 2}) == "invalid_delegation_constraint"
    assert code_of(constraints_json={"zzz": None}) == "invalid_delegation_constraint"


def test_max_depth_mismatch_checked_after_unknown_keys() -> None:
    assert code_of(constraints={"arbitrary": 1, "max_depth": 2, "max_hops": 3}) == "invalid_delegation_constraint"


def test_apply_broad_defaults() -> None:
    given = {"ttl_seconds": 30}
    out = apply_broad_defaults(given)
    assert out == {"ttl_seconds": 30, "broad_reason": "resource_null_delegation", "policy_approved": True}
    assert given == {"ttl_seconds": 30}
    kept = apply_broad_defaults({"broad_reason": "ops", "policy_approved": False})
    assert kept == {"broad_reason": "ops", "policy_approved": True}


def test_parse_stored_constraints() -> None:
    assert parse_stored_constraints({}) == {}
    assert parse_stored_constraints({"max_depth": 3}) == {"max_depth": 3, "max_hops": 3}
    assert parse_stored_constraints({"resources": ["calendar"], "max_hops": 2}) == {
        "resources": ["calendar"],
        "max_hops": 2,
    }
    assert parse_stored_constraints({"legacy": True}) is None
    assert parse_stored_constraints({"budget": 5000}) is None
    assert parse_stored_constraints({"max_depth": 2, "max_hops": 3}) is None
    assert parse_stored_constraints(None) is None
    assert parse_stored_constraints([]) is None
    assert parse_stored_constraints("{}") is None
