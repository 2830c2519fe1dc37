"""The one error type every layer raises for a client-visible failure.

`CoordinatorError(status, code, **fields)` becomes the HTTP answer `{"error": code, **fields}` with
that status. Activities raise it too; workflows carry it across Temporal as an ApplicationError
of type "CoordinatorError" whose details are `[status, body]` (see `to_details` / `from_details`).
"""

from __future__ import annotations

from typing import Any


class CoordinatorError(Exception):
    def __init__(self, status: int, code: str, **fields: Any) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.fields = fields

    @property
    def body(self) -> dict[str, Any]:
        return {"error": self.code, **self.fields}

    def to_details(self) -> list[Any]:
        return [self.status, self.body]

    @classmethod
    def from_details(cls, details: list[Any] | tuple[Any, ...]) -> "CoordinatorError":
        status, body = details[0], dict(details[1])
        code = body.pop("error")
        return cls(int(status), code, **body)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"CoordinatorError({self.status}, {self.code!r}, {self.fields!r})"
