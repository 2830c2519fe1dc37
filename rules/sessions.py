"""Request-shape rules for session start (§4.4)."""

from __future__ import annotations

from typing import Any

from rules.jscompat import js_trim, utf16_len
from rules.lifecycle import DEFAULT_TASK_TTL_SECONDS, LIFECYCLES

MAX_LABELS = 32
MAX_LABEL_LENGTH = 64


def normalize_labels(labels: Any) -> list[str]:
    """Trim each label (JavaScript trim); each must then be 1..64 characters, at most 32 labels.

    Raises ValueError naming the problem (the API answers 400 invalid_body with it).
    """
    if not isinstance(labels, list):
        raise ValueError("labels must be an array of strings")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"labels must contain at most {MAX_LABELS} items")
    out: list[str] = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise ValueError(f"labels[{i}] must be a string")
        trimmed = js_trim(label)
        length = utf16_len(trimmed)  # zod counts UTF-16 code units
        if length < 1:
            raise ValueError(f"labels[{i}] must not be empty")
        if length > MAX_LABEL_LENGTH:
            raise ValueError(f"labels[{i}] must be at most {MAX_LABEL_LENGTH} characters")
        out.append(trimmed)
    return out


def resolve_ttl(lifecycle: str, ttl_seconds: int | None) -> int | None:
    """An explicit ttl wins; otherwise tasks live 3600 s and services have no ttl (lease only)."""
    if lifecycle not in LIFECYCLES:
        raise ValueError(f"lifecycle must be one of {', '.join(LIFECYCLES)}")
    if ttl_seconds is not None:
        return ttl_seconds
    return DEFAULT_TASK_TTL_SECONDS if lifecycle == "task" else None
