"""HTTP conventions shared by every route (reference §2): request ids, JSON errors, parsing.

Routes parse their inputs through `path_ids`, `parse_query` and `parse_body` so every validation
failure has the reference's shape: invalid_params, invalid_query, invalid_body with details.issues.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rules.errors import CoordinatorError
from rules.ids import is_valid_id

M = TypeVar("M", bound=BaseModel)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")


def adopt_request_id(header: str | None) -> str:
    return header if header and _REQUEST_ID.match(header) else str(uuid.uuid4())


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"


def error_response(request: Request, exc: CoordinatorError) -> JSONResponse:
    body = dict(exc.body)
    if exc.code in ("idempotency_key_invalid", "idempotency_key_multiple"):
        body["request_id"] = request_id(request)
    headers = {}
    if exc.status == 503:
        headers["Retry-After"] = "1"
    if "retry_after" in body:
        headers["Retry-After"] = str(body.pop("retry_after"))
    return JSONResponse(body, status_code=exc.status, headers=headers)


def internal_error(request: Request, status: int, description: str) -> JSONResponse:
    return JSONResponse({"error": "internal_error", "error_description": description,
                         "requestId": request_id(request)}, status_code=status)


def path_ids(request: Request) -> dict[str, str]:
    """Every path parameter must look like an id; checked before any database access."""
    params = request.path_params
    for value in params.values():
        if not is_valid_id(value):
            raise CoordinatorError(400, "invalid_params")
    return params


def _issues(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"path": list(err["loc"]), "message": err["msg"]} for err in exc.errors()]


class InvalidBody(Exception):
    def __init__(self, description: str, issues: list[dict[str, Any]]) -> None:
        super().__init__(description)
        self.description = description
        self.issues = issues


def invalid_body_response(request: Request, exc: InvalidBody) -> JSONResponse:
    return JSONResponse({"error": "invalid_body", "error_description": exc.description,
                         "requestId": request_id(request), "details": {"issues": exc.issues}}, status_code=400)


class MalformedJson(Exception):
    pass


async def read_json(request: Request, *, required: bool) -> Any:
    # The middleware rejects a declared Content-Length over the limit; a chunked body is counted here.
    limit = request.app.state.settings.COORDINATOR_BODY_LIMIT_BYTES
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise StarletteHTTPException(413, "Request body is too large")
    raw = bytes(raw)
    if not raw.strip():
        if required:
            raise InvalidBody("body is required", [{"path": [], "message": "Required"}])
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJson(str(exc)) from exc


def validate_body(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise InvalidBody("body must be a JSON object", [{"path": [], "message": "Expected object"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = _issues(exc)
        raise InvalidBody("; ".join(f"{'.'.join(map(str, i['path'])) or 'body'}: {i['message']}" for i in issues),
                          issues) from exc


async def parse_body(request: Request, model: type[M], *, required: bool = True) -> M:
    data = await read_json(request, required=required)
    return validate_body(model, {} if data is None else data)


def parse_query(request: Request, model: type[M]) -> M:
    params: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, value)
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise CoordinatorError(400, "invalid_query", details={"issues": _issues(exc)}) from exc


def no_content() -> Response:
    return Response(status_code=204)
