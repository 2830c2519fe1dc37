"""rules.idempotency: key format (§13 case 47) and digests (case 52)."""

import hashlib

import pytest

from rules.errors import CoordinatorError
from rules.idempotency import (
    KEY_NAMESPACE,
    key_digest,
    parse_idempotency_key,
    request_digest,
    validate_idempotency_key,
)

CURRENT = b"test-hmac-key-current"
PREVIOUS = b"test-hmac-key-previous"


def test_absent_header_is_none() -> None:
    assert parse_idempotency_key([]) is None


def test_accepted_key_is_verbatim() -> None:
    assert parse_idempotency_key(["ticket-queue:v1:PP-8412"]) == "ticket-queue:v1:PP-8412"
    assert validate_idempotency_key("ticket-queue:v1:PP-8412") == "ticket-queue:v1:PP-8412"
    assert validate_idempotency_key("a b") == "a b"  # inner whitespace is fine
    assert validate_idempotency_key("k" * 255) == "k" * 255


@pytest.mark.parametrize("key", [" key", "key ", "key\nvalue", "a" * 256, "", "\tkey", "key\u00a0", "\ufeffkey"])
def test_case_47_invalid_keys(key: str) -> None:
    with pytest.raises(CoordinatorError) as info:
        parse_idempotency_key([key])
    err = info.value
    assert err.status == 400
    assert err.code == "idempotency_key_invalid"
    assert list(err.body) == ["error", "message", "request_id"]
    assert err.body["error"] == "idempotency_key_invalid"
    assert isinstance(err.body["message"], str) and err.body["message"]
    with pytest.raises(CoordinatorError):
        validate_idempotency_key(key)


@pytest.mark.parametrize("key", ["a\x00b", "a\x1fb", "a\x7fb", "a\rb"])
def test_control_characters_invalid(key: str) -> None:
    with pytest.raises(CoordinatorError) as info:
        validate_idempotency_key(key)
    assert info.value.code == "idempotency_key_invalid"


def test_length_counts_utf8_bytes() -> None:
    assert validate_idempotency_key("é" * 127) == "é" * 127  # 254 bytes
    with pytest.raises(CoordinatorError):
        validate_idempotency_key("é" * 128)  # 256 bytes, 128 characters
    with pytest.raises(CoordinatorError):
        validate_idempotency_key("\U0001F600" * 64)  # 256 bytes


def test_multiple_values() -> None:
    with pytest.raises(CoordinatorError) as info:
        parse_idempotency_key(["a", "b"])
    assert info.value.status == 400
    assert info.value.code == "idempotency_key_multiple"
    assert info.value.body["request_id"] is None
    assert info.value.body["message"]
    # Even two identical values are "multiple".
    with pytest.raises(CoordinatorError):
        parse_idempotency_key(["a", "a"])


def test_key_digest_matches_node_hmac() -> None:
    # Values from Node: createHmac('sha256', k).update('caracal:coordinator:idempotency:v1\0').update(key)
    assert key_digest("ticket-queue:v1:PP-8412", CURRENT).hex() == (
        "469e7ca9876b0d3bbda96cf77504746e036f24a888a227c326c15cab1b7b6573"
    )
    assert key_digest("ticket-queue:v1:PP-8412", PREVIOUS).hex() == (
        "d1454bcc728bc353cd25a8d4b92f8cc8c3771ec779078fbd299c592f48dc8ba9"
    )
    assert key_digest("clé-\U0001F600", b"k").hex() == (
        "884950010f2312ce4dcd65e20a686d9c91a192aeeea4bf338cec8dd188086e12"
    )
    # Node encodes a lone surrogate as U+FFFD.
    assert key_digest("a\ud800b", b"k").hex() == (
        "b75e71d2c6c8417f7349a8109c189ec0e44afdcd5ae035f93f66c9875a8749a8"
    )


def test_case_52_digest_properties() -> None:
    key = "ticket-queue:v1:PP-8412"
    digest = key_digest(key, CURRENT)
    assert len(digest) == 32
    assert digest != key_digest(key, PREVIOUS)
    assert digest == key_digest(key, CURRENT)  # deterministic: rotation lookups recompute it
    assert key.encode() not in digest
    assert KEY_NAMESPACE == b"caracal:coordinator:idempotency:v1"
    assert digest != key_digest(key + "x", CURRENT)


def test_request_digest_is_sha256_of_canonical_json() -> None:
    obj = {
        "principal": {"client_id": "app-1", "subject": "user-1"},
        "application_id": "app-1",
        "labels": ["x"],
        "ttl_seconds": 3600,
        "metadata": {"n": 1.0, "f": 0.5},
    }
    # Node: sha256 of the canonical text of this object.
    assert request_digest(obj).hex() == "de57744715afc80d3ca5bea3c626cae67bca64d95b39a1725d63a3b57b0f0da8"
    assert len(request_digest(obj)) == 32
    reordered = dict(reversed(list(obj.items())))
    assert request_digest(reordered) == request_digest(obj)
    assert request_digest({**obj, "metadata": {"n": 2}}) != request_digest(obj)
    assert request_digest({}) == hashlib.sha256(b"{}").digest()
