"""rules.sessions: labels and ttl defaults (§4.4, §13 cases 19, 20, 23)."""

import pytest

from rules.sessions import normalize_labels, resolve_ttl


def test_case_23_label_trimmed() -> None:
    assert normalize_labels(["  x "]) == ["x"]
    assert normalize_labels([]) == []
    assert normalize_labels(["a", " b", "c\t\n"]) == ["a", "b", "c"]


def test_javascript_trim_set() -> None:
    assert normalize_labels(["\ufeffx\u3000"]) == ["x"]  # JS trims BOM and ideographic space
    assert normalize_labels(["\x1cx"]) == ["\x1cx"]  # Python strip() would remove U+001C; JS keeps it


def test_case_23_limits() -> None:
    assert normalize_labels(["l"] * 32) == ["l"] * 32
    with pytest.raises(ValueError, match="32"):
        normalize_labels(["l"] * 33)
    assert normalize_labels(["x" * 64]) == ["x" * 64]
    with pytest.raises(ValueError, match="64"):
        normalize_labels(["x" * 65])
    # Length is checked after trimming.
    assert normalize_labels(["  " + "x" * 64 + "  "]) == ["x" * 64]


def test_length_counts_utf16_units() -> None:
    assert normalize_labels(["\U0001F600" * 32]) == ["\U0001F600" * 32]
    with pytest.raises(ValueError):
        normalize_labels(["\U0001F600" * 33])  # 66 UTF-16 units


@pytest.mark.parametrize("bad", [[""], ["   "], ["ok", " \n "]])
def test_empty_after_trim(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_labels(bad)


@pytest.mark.parametrize("bad", ["x", None, [1], [None], ["a", 2]])
def test_wrong_types(bad: object) -> None:
    with pytest.raises(ValueError):
        normalize_labels(bad)  # type: ignore[arg-type]


def test_resolve_ttl() -> None:
    assert resolve_ttl("task", None) == 3600  # case 19
    assert resolve_ttl("service", None) is None  # case 20
    assert resolve_ttl("task", 60) == 60
    assert resolve_ttl("service", 600) == 600
    with pytest.raises(ValueError):
        resolve_ttl("daemon", None)
