"""Small helpers that reproduce JavaScript string semantics.

The reference service is TypeScript (zod + JSON.stringify). Python strings count and order by code
point, JavaScript by UTF-16 code unit, and the two languages trim different whitespace sets; these
helpers make the rules in this package agree with the reference byte for byte.
"""

from __future__ import annotations

import re

# ECMAScript WhiteSpace + LineTerminator (what String.prototype.trim strips). Differs from
# str.strip(): JS also strips U+FEFF but not U+001C..U+001F or U+0085.
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)

_SURROGATE = re.compile("[\ud800-\udfff]")


def js_trim(value: str) -> str:
    """`String.prototype.trim`."""
    return value.strip(JS_WHITESPACE)


def _utf16(value: str) -> bytes:
    return value.encode("utf-16-be", "surrogatepass")


def utf16_len(value: str) -> int:
    """`String.prototype.length`: astral characters count twice."""
    return len(_utf16(value)) // 2


def utf16_key(value: str) -> bytes:
    """Sort key equal to JavaScript's default string order (UTF-16 code units).

    Big-endian UTF-16 bytes compare exactly like the code-unit sequence.
    """
    return _utf16(value)


def js_sorted(values: "list[str] | set[str] | frozenset[str]") -> list[str]:
    """`[...values].sort()` for strings."""
    return sorted(values, key=utf16_key)


def join_surrogates(value: str) -> str:
    """Combine surrogate pairs into code points; lone surrogates stay as they are.

    A Python str may hold a pair as two code points (a JS string never distinguishes the two);
    after this, any surrogate left is a lone one in the JavaScript sense.
    """
    if not _SURROGATE.search(value):
        return value
    return _utf16(value).decode("utf-16-be", "surrogatepass")


def js_utf8(value: str) -> bytes:
    """UTF-8 bytes as Node's Buffer.from(string) produces them (lone surrogates -> U+FFFD)."""
    joined = join_surrogates(value)
    return _SURROGATE.sub("\ufffd", joined).encode("utf-8")


def escape_lone_surrogates(text: str) -> str:
    """Replace lone surrogates with `\\udxxx` escapes, as well-formed JSON.stringify does."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)
