"""rules.ids: id pattern and UUIDv7 minting."""

import re
import time

from rules.ids import ID_PATTERN, is_valid_id, new_id


def test_pattern_is_the_contract() -> None:
    assert ID_PATTERN.pattern == r"^[A-Za-z0-9_.\-:]{1,128}$"


def test_valid_ids() -> None:
    assert is_valid_id("z1")
    assert is_valid_id("a" * 128)
    assert is_valid_id("A-b_c.d:e")


def test_invalid_ids() -> None:
    assert not is_valid_id("")
    assert not is_valid_id("a" * 129)
    assert not is_valid_id("z!1")
    assert not is_valid_id("../z1")
    assert not is_valid_id("z 1")
    assert not is_valid_id("z1\n")  # Python's `$` alone would accept this
    assert not is_valid_id("é")
    assert not is_valid_id(None)
    assert not is_valid_id(12)


def test_new_id_is_uuid7_and_time_ordered() -> None:
    first = new_id()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first)
    assert is_valid_id(first)
    time.sleep(0.002)
    second = new_id()
    assert second > first
    ids = [new_id() for _ in range(200)]
    assert len(set(ids)) == 200
