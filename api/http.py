"""HTTP conventions shared by every route (reference §2): request ids, JSON errors, how a body is
read, and how validation failures become the reference's answers.

Routes declare their inputs as typed FastAPI parameters (path, query and body models through
`Annotated`), so `/openapi.json` documents them. The wire keeps the reference's shapes:

* every router uses `CoordinatorRoute`, whose `CoordinatorRequest` reads the body the reference's
  way: `application/json` (or `+json`, or no content type) is parsed; `text/plain` and form bodies
  are not read at all (as if absent); any other media type is 415; more than
  `COORDINATOR_BODY_LIMIT_BYTES` is 413; malformed JSON is 400 `internal_error`. A JSON body nested
  deeper than `MAX_JSON_DEPTH`, or holding a non-finite number (`NaN`, `Infinity`, `1e400`), a NUL
  character or a lone surrogate anywhere (keys included) is 400 `invalid_body`: Postgres could not
  store it, and the request digests could not hash it. Such a body is only answered once the
  caller is authenticated, as the reference answers body errors inside the handler;
* repeated query keys: the first value wins (the reference's query parser);
* `validation_error_response` maps FastAPI's `RequestValidationError` by the error's location:
  path → `invalid_params`, query → `invalid_query` (with `details.issues`), body → `invalid_body`
  (with `error_description`, `requestId` and `details.issues`).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.datastructures import Default, DefaultPlaceholder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import QueryParams

from rules.errors import CoordinatorError
from rules.ids import is_valid_id

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")

# Deeper JSON is refused before it is parsed: every layer below (json, pydantic, canonical JSON,
# Postgres) walks it recursively.
MAX_JSON_DEPTH = 64
# Media types the reference never reads as a body: the handler sees no body.
UNREAD_MEDIA_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
# Stands for a body that was refused (413, 415, malformed, hostile): never valid for a body model,
# so the route's validation fails and `validation_error_response` answers with the refusal.
REFUSED_BODY = b"\x00"


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


def internal_error(request: Request, status: int, description: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": "internal_error", "error_description": description,
                         "requestId": request_id(request)}, status_code=status, headers=headers)


def path_ids(request: Request) -> dict[str, str]:
    """Every path parameter must look like an id; checked before the bearer and any database access."""
    params = request.path_params
    for value in params.values():
        if not is_valid_id(value):
            raise CoordinatorError(400, "invalid_params")
    return params


def no_content() -> Response:
    return Response(status_code=204)


def rendered_json(body: str | bytes) -> Response:
    """A 200 whose JSON body Postgres rendered (`storage.pages.json_page`, `storage.sessions.session_body`):
    sent as it is, without decoding and validating it again. The route declares its `response_model`."""
    return Response(body, media_type="application/json")


# ---------------------------------------------------------------------------------------------
# Refused bodies
# ---------------------------------------------------------------------------------------------


class InvalidBody(Exception):
    """400 invalid_body: `{"error","error_description","requestId","details":{"issues":[…]}}`."""

    def __init__(self, description: str, issues: list[dict[str, Any]]) -> None:
        super().__init__(description)
        self.description = description
        self.issues = issues

    def response(self, request: Request) -> JSONResponse:
        return JSONResponse({"error": "invalid_body", "error_description": self.description,
                             "requestId": request_id(request), "details": {"issues": self.issues}},
                            status_code=400)


class BodyRefused(Exception):
    """A body the framework refuses before validation: `internal_error` with the error's own status
    (400 malformed JSON, 413 too large, 415 unsupported media type), as the reference answers."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description

    def response(self, request: Request) -> JSONResponse:
        return internal_error(request, self.status, self.description)


def invalid_body_response(request: Request, exc: InvalidBody) -> JSONResponse:
    return exc.response(request)


def _hostile(message: str, path: list[Any] | None = None) -> InvalidBody:
    path = path or []
    where = ".".join(map(str, path)) or "body"
    return InvalidBody(f"{where}: {message}", [{"path": path, "message": message}])


class _NonFinite(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _bounded_int(text: str) -> int:
    # A JSON number is a double for the reference; beyond ~1.8e308 it is Infinity. Also spares
    # int() its 4300-digit ValueError.
    if len(text.lstrip("-")) > 309:
        raise _NonFinite(text[:20] + "…")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _NonFinite(text[:20] + "…") from None
    return value


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")
# Escapes that may decode to NUL or a surrogate: only then are the decoded strings walked.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(text: str) -> int:
    """How deeply `text` nests arrays and objects, counted without recursion (strings skipped)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _bad_string(value: str) -> str | None:
    if "\x00" in value:
        return "strings must not contain U+0000"
    if _SURROGATE.search(value):
        return "strings must not contain lone surrogates"
    return None


def _check_strings(value: Any) -> None:
    """Walk the decoded document (iteratively) for NUL and lone surrogates in keys and values."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            problem = _bad_string(item)
            if problem:
                raise _hostile(problem, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = _bad_string(key)
                if problem:
                    raise _hostile(problem, path)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))


def decode_json(raw: bytes) -> Any:
    """Parse a request body: BodyRefused (malformed) or InvalidBody (hostile) when it is refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRefused(400, f"Body is not valid JSON: {exc}") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise _hostile(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise BodyRefused(400, f"Body is not valid JSON: {exc}") from None
    except _NonFinite as exc:
        raise _hostile(f"numbers must be finite, got {exc}") from None
    except (ValueError, RecursionError) as exc:  # defensive: the checks above should leave none
        raise _hostile(f"unreadable JSON: {type(exc).__name__}") from None
    if _SUSPECT_ESCAPE.search(text):
        _check_strings(value)
    return value


def media_type(request: Request) -> str | None:
    value = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return value or None


def is_json_media(media: str | None) -> bool:
    return media is None or media == "application/json" or (media.startswith("application/")
                                                             and media.endswith("+json"))


class CoordinatorRequest(Request):
    """Reads the body as the reference does (module docstring); repeated query keys: first wins."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            self._body = await self._read_body()
        return self._body

    async def _read_body(self) -> bytes:
        limit = self.app.state.settings.COORDINATOR_BODY_LIMIT_BYTES
        raw = bytearray()
        # The middleware refuses a declared Content-Length over the limit; a chunked body is counted here.
        async for chunk in self.stream():
            raw += chunk
            if len(raw) > limit:
                return self._refuse(BodyRefused(413, "Request body is too large"))
        if not raw.strip():
            return b""
        media = media_type(self)
        if media in UNREAD_MEDIA_TYPES:
            return b""
        if not is_json_media(media):
            return self._refuse(BodyRefused(415, f"Unsupported Media Type: {media}"))
        return bytes(raw)

    def _refuse(self, refusal: BodyRefused | InvalidBody) -> bytes:
        self.state.body_refusal = refusal
        return REFUSED_BODY

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            if getattr(self.state, "body_refusal", None) is not None:
                self._json = REFUSED_BODY
            else:
                try:
                    self._json = decode_json(raw)
                except (BodyRefused, InvalidBody) as refusal:
                    self._json = self._refuse(refusal)
        return self._json

    @property
    def query_params(self) -> QueryParams:
        if not hasattr(self, "_first_query_params"):
            first: dict[str, str] = {}
            for key, value in super().query_params.multi_items():
                first.setdefault(key, value)
            self._first_query_params = QueryParams(list(first.items()))
        return self._first_query_params


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI query parameters of a query model, as FastAPI documents `Annotated[Model, Query()]`."""
    properties = model.model_json_schema()["properties"]
    parameters = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        schema = dict(properties[key])
        if "default" in schema and schema["default"] is None:
            del schema["default"]
        parameter: dict[str, Any] = {"name": key, "in": "query", "required": field.is_required(), "schema": schema}
        if field.description:
            parameter["description"] = field.description
        parameters.append(parameter)
    return parameters


class CoordinatorRoute(APIRoute):
    """Every route of the API: its handler gets a `CoordinatorRequest`. A body with no content type
    is read as JSON (the published SDK sends bodiless calls without one, and clients such as curl
    -d send JSON without one). A dependency carrying a `query_model` (api/routes/common.py
    `list_query`) has that model's fields documented as the operation's query parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("strict_content_type", Default(True)), DefaultPlaceholder):
            kwargs["strict_content_type"] = False
        super().__init__(*args, **kwargs)
        documented = [parameter for sub in self.dependant.dependencies
                      if (model := getattr(sub.call, "query_model", None)) is not None
                      for parameter in query_parameters(model)]
        if documented:
            extra = dict(self.openapi_extra or {})
            extra["parameters"] = [*extra.get("parameters", []), *documented]
            self.openapi_extra = extra

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def coordinator_handler(request: Request) -> Response:
            return await handler(CoordinatorRequest(request.scope, request.receive))

        return coordinator_handler


def _issues(errors: list[dict[str, Any]], strip: int) -> list[dict[str, Any]]:
    return [{"path": list(err["loc"][strip:]), "message": str(err["msg"])} for err in errors]


def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One handler for every typed parameter: the reference's code by where the error is."""
    refusal = getattr(request.state, "body_refusal", None)
    if refusal is not None:
        return refusal.response(request)
    errors = list(exc.errors())

    def at(*places: str) -> list[dict[str, Any]]:
        return [e for e in errors if e.get("loc") and e["loc"][0] in places]

    if at("path"):
        return error_response(request, CoordinatorError(400, "invalid_params"))
    query = at("query", "header", "cookie")
    if query:
        return error_response(request, CoordinatorError(400, "invalid_query", details={"issues": _issues(query, 1)}))
    body = at("body") or errors
    issues = _issues(body, 1)
    for issue, err in zip(issues, body, strict=True):
        if err.get("type") == "missing" and not issue["path"]:
            issue["message"] = "Required"
    description = "; ".join(f"{'.'.join(map(str, i['path'])) or 'body'}: {i['message']}" for i in issues)
    return InvalidBody(description, issues).response(request)
