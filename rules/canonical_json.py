"""Canonical JSON identical to the reference's `canonicalJson` (§7).

Request digests are SHA-256 over this text, so it has to match JavaScript exactly: keys sorted by
UTF-16 code units, no whitespace, strings escaped as JSON.stringify escapes them, numbers printed as
`Number.prototype.toString` prints doubles.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from rules.jscompat import escape_lone_surrogates, join_surrogates, utf16_key

_MAX_SAFE_INTEGER = 2**53 - 1


def canonical_json(value: Any) -> str:
    """Serialize `value` canonically; raise ValueError for NaN/Infinity or unsupported types."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_js_string(value))
    elif isinstance(value, (int, float)):
        out.append(js_number(value))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"canonical_json: object key must be a string, got {type(key).__name__}")
        out.append("{")
        for i, key in enumerate(sorted(value, key=utf16_key)):
            if i:
                out.append(",")
            out.append(_js_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    else:
        raise ValueError(f"canonical_json: unsupported value of type {type(value).__name__}")


def _js_string(value: str) -> str:
    # json.dumps escapes exactly the set JSON.stringify escapes (quote, backslash, \b\f\n\r\t,
    # other C0 controls as lowercase \u00xx) except lone surrogates, which JS writes as \udxxx.
    return escape_lone_surrogates(json.dumps(join_surrogates(value), ensure_ascii=False))


def js_number(value: int | float) -> str:
    """`String(n)` for a JavaScript number (a double)."""
    if isinstance(value, bool):
        raise ValueError("canonical_json: bool is not a number")
    if isinstance(value, int):
        if -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
            return str(value)
        try:
            value = float(value)  # JS would hold the nearest double
        except OverflowError:
            raise ValueError("canonical_json: non-finite number") from None
    if not math.isfinite(value):
        raise ValueError("canonical_json: non-finite number")
    if value == 0:
        return "0"  # also -0
    # repr() is the shortest round-tripping decimal, the same digits ECMAScript picks; only the
    # layout (ECMA-262 Number::toString) differs.
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    digits = list(digit_tuple)
    assert isinstance(exponent, int)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exponent += 1
    s = "".join(map(str, digits))
    k = len(s)
    n = exponent + k  # value = 0.s * 10**n
    if k <= n <= 21:
        text = s + "0" * (n - k)
    elif 0 < n <= 21:
        text = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + s
    else:
        e = n - 1
        mantissa = s[0] + ("." + s[1:] if k > 1 else "")
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return "-" + text if value < 0 else text
