"""rules.canonical_json against outputs produced by Node's JSON.stringify / String(n)."""

import math

import pytest

from rules.canonical_json import canonical_json, js_number

# (python value, exact JavaScript String(n))
JS_NUMBERS = [
    (0, "0"),
    (0.0, "0"),
    (-0.0, "0"),
    (1, "1"),
    (-1, "-1"),
    (1.0, "1"),
    (2.0, "2"),
    (100.0, "100"),
    (1.5, "1.5"),
    (0.1, "0.1"),
    (0.1 + 0.2, "0.30000000000000004"),
    (1e20, "100000000000000000000"),
    (1e21, "1e+21"),
    (1.5e21, "1.5e+21"),
    (123456789012345680000.0, "123456789012345680000"),
    (1e-6, "0.000001"),
    (1e-7, "1e-7"),
    (1.5e-7, "1.5e-7"),
    (1.2345e-10, "1.2345e-10"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (9007199254740992, "9007199254740992"),
    (9007199254740993, "9007199254740992"),  # beyond 2**53 a JS number rounds
    (12345678901234567890, "12345678901234567000"),
    (10**21, "1e+21"),
    (-123.456, "-123.456"),
    (1 / 3, "0.3333333333333333"),
    (2 / 3, "0.6666666666666666"),
    (1e300, "1e+300"),
    (4.35, "4.35"),
    (0.000001234, "0.000001234"),
    (100.5, "100.5"),
    (1e16, "10000000000000000"),
    (123e-20, "1.23e-18"),
]


@pytest.mark.parametrize(("value", "expected"), JS_NUMBERS)
def test_numbers_match_javascript(value: float, expected: str) -> None:
    assert js_number(value) == expected
    assert canonical_json(value) == expected


def test_object_keys_sorted_by_utf16_code_units() -> None:
    # Node: canonicalJson({...}) -- U+1F600 (surrogates D83D DE00) sorts before U+FFFF in JS,
    # after it by code point.
    value = {
        "b": 1,
        "a": [True, False, None, 'x\u0000\u001f\u007f\u2028"\\\n\t\b\f\r'],
        "\uffff": 1,
        "\U0001F600": 2,
        "é": 3,
        "Z": 4,
        "": 5,
    }
    expected = (
        '{"":5,"Z":4,"a":[true,false,null,"x\\u0000\\u001f\u007f\u2028\\"\\\\\\n\\t\\b\\f\\r"],'
        '"b":1,"é":3,"\U0001F600":2,"\uffff":1}'
    )
    assert canonical_json(value) == expected


def test_emoji_vs_ffff_order() -> None:
    assert canonical_json({"\uffff": 0, "\U0001F600": 1}) == '{"\U0001F600":1,"\uffff":0}'


def test_nested_request_object_and_no_whitespace() -> None:
    obj = {
        "principal": {"client_id": "app-1", "subject": "user-1"},
        "application_id": "app-1",
        "labels": ["x"],
        "ttl_seconds": 3600,
        "metadata": {"n": 1.0, "f": 0.5},
    }
    assert canonical_json(obj) == (
        '{"application_id":"app-1","labels":["x"],"metadata":{"f":0.5,"n":1},'
        '"principal":{"client_id":"app-1","subject":"user-1"},"ttl_seconds":3600}'
    )


def test_lone_surrogates_escaped_like_well_formed_stringify() -> None:
    assert canonical_json("\ud800x\udfff") == '"\\ud800x\\udfff"'
    # A surrogate pair held as two code points is one character to JavaScript.
    assert canonical_json("\ud83d\ude00") == '"\U0001F600"'


def test_scalars_and_arrays() -> None:
    assert canonical_json(None) == "null"
    assert canonical_json(True) == "true"
    assert canonical_json(False) == "false"
    assert canonical_json([]) == "[]"
    assert canonical_json({}) == "{}"
    assert canonical_json([1, [2, {"b": None, "a": "é"}]]) == '[1,[2,{"a":"é","b":null}]]'
    assert canonical_json((1, 2)) == "[1,2]"
    assert canonical_json("ü/\u00e9") == '"ü/é"'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 10**400, {1, 2}, object(), b"x", {1: "a"}])
def test_rejects_non_finite_and_unsupported(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)
    with pytest.raises(ValueError):
        canonical_json({"nested": [bad]})
