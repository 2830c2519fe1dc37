"""Identifier format and minting."""

from __future__ import annotations

import re
from typing import TypeGuard

import uuid_utils

# Same pattern as path params, x-request-id and JWT zone claims (§2). Match with
# `is_valid_id` (fullmatch): Python's `$` would also accept a trailing newline.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")


def is_valid_id(s: object) -> TypeGuard[str]:
    return isinstance(s, str) and ID_PATTERN.fullmatch(s) is not None


def new_id() -> str:
    """A UUIDv7 string: time ordered, so `ORDER BY id DESC` pages newest first."""
    return str(uuid_utils.uuid7())
