"""What the routers share: the router factory (the `CoordinatorRoute` class and the documented error
answers), the parameter types, pagination, and the helpers more than one router uses."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Request, params
from fastapi import Body as BodyParam
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import SkipJsonSchema

from api.deps import Caller, Services
from api.http import CoordinatorRoute
from rules.errors import CoordinatorError
from rules.idempotency import parse_idempotency_key
from rules.timefmt import parse_rfc3339
from storage import history
from storage.idempotency import CreateResult
from storage.pages import Page  # noqa: F401 (re-exported: the list routes' response model)

# ---------------------------------------------------------------------------------------------
# Documented error answers
# ---------------------------------------------------------------------------------------------


class ErrorIssue(BaseModel):
    path: list[str | int]
    message: str


class ErrorDetails(BaseModel):
    issues: list[ErrorIssue]


class ErrorBody(BaseModel):
    """Every error answer: `error` is the code; the other fields come with some codes."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="The error code, e.g. invalid_body, session_not_found, rate_limited")
    error_description: str | None = Field(default=None, description="invalid_body and internal_error")
    requestId: str | None = Field(default=None, description="invalid_body and internal_error")  # noqa: N815
    details: ErrorDetails | None = Field(default=None, description="invalid_body and invalid_query")
    message: str | None = Field(default=None, description="idempotency errors")
    request_id: str | None = Field(default=None, description="idempotency_key_invalid, idempotency_key_multiple")


_DESCRIPTIONS = {
    400: "Invalid path ids (`invalid_params`), query (`invalid_query`), body (`invalid_body`), malformed "
         "JSON (`internal_error`), or a rule of the operation",
    401: "Missing or invalid bearer (`missing_token`, `invalid_token`, `identity_revoked`)",
    403: "Not allowed (`missing_scope`, `zone_mismatch`, ownership and consent codes)",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Body larger than COORDINATOR_BODY_LIMIT_BYTES (`internal_error`)",
    415: "Body of an unsupported media type (`internal_error`)",
    429: "Rate limited or over a capacity limit (`Retry-After` on rate limits)",
    503: "Postgres unavailable (`postgres_unavailable`, `Retry-After`)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


ZONE_ERRORS = (400, 401, 403, 404, 409, 413, 415, 429, 503)


def make_router(tag: str, *, statuses: Sequence[int] = ZONE_ERRORS,
                dependencies: Sequence[params.Depends] | None = None) -> APIRouter:
    """A router whose routes read bodies the reference's way and document the error answers."""
    return APIRouter(tags=[tag], route_class=CoordinatorRoute, responses=error_responses(*statuses),
                     dependencies=dependencies, strict_content_type=False)


# ---------------------------------------------------------------------------------------------
# Parameter types
# ---------------------------------------------------------------------------------------------

ID_REGEX = r"^[A-Za-z0-9_.\-:]{1,128}$"
_ID_DOC = "An id: 1-128 characters of A-Z a-z 0-9 _ . - :"

ZoneId = Annotated[str, Path(pattern=ID_REGEX, description="The zone")]
SessionId = Annotated[str, Path(pattern=ID_REGEX, description="A session id")]
EdgeId = Annotated[str, Path(pattern=ID_REGEX, description="A delegation edge id")]
InvocationId = Annotated[str, Path(pattern=ID_REGEX, description="An invocation id")]
ItemId = Annotated[str, Path(pattern=ID_REGEX, description=_ID_DOC)]

NonEmpty = Annotated[str, Field(min_length=1)]


def _integral(value: Any) -> Any:
    # A JSON number is a double: 2.0 is the integer 2 (zod's .int() agrees); 2.5 stays a float and fails.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers of a body: strict (no strings, no booleans), but an integral JSON number like 30.0 counts.
# Constraints go before it (`Annotated[int, Field(ge=1), INTEGRAL]`) so that they stay in the schema.
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]
# Query strings reach SQL as text parameters: no NUL (Postgres refuses it).
QueryText = Annotated[str, Field(min_length=1, pattern=r"^[^\x00]+$")]
IdempotencyKeyHeader = Annotated[str | SkipJsonSchema[None], Header(
    alias="Idempotency-Key", description="1-255 UTF-8 bytes, no surrounding whitespace or control characters; "
                                         "sent once")]


# A body field that may be absent but not null (zod `.optional()`): `x: NonEmpty = absent()`. The
# default (None) is not validated; an explicit null fails the type (invalid_body); the schema shows
# the type alone.


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent(**kw: Any) -> Any:
    """`Field(default=None)` for a not-null optional field, without `default: null` in the schema."""
    return Field(default=None, json_schema_extra=_drop_default, **kw)


class Body(BaseModel):
    """Request bodies: JSON types as sent (no coercion), unknown keys ignored (reference §2)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class NoFields(Body):
    """This operation reads no field: send no body, or any JSON object (ignored)."""


# For POST/PATCH routes that take no body, documented as an optional empty object.
IgnoredBody = Annotated[NoFields | None, BodyParam(description="No fields; the body may be omitted")]


Q = TypeVar("Q", bound=BaseModel)


def list_query(model: type[Q]) -> Any:
    """`Annotated[Model, list_query(Model)]`: a list route's query as `model`, validated in one call
    (FastAPI's per-field query parsing cost a list request a third of its CPU), after authentication
    as a `Query()` model is, first value of a repeated key wins; errors are 400 `invalid_query` with
    the issues. `CoordinatorRoute` documents the model's fields as the query parameters.

    Only for bodiless routes: a dependency answers before the body's own refusal would, so routes
    with a body keep `Annotated[Model, Query()]`, validated with the body in FastAPI's one pass."""

    async def parse(request: Request, _: Caller) -> Q:
        try:
            return model.model_validate(dict(request.query_params))
        except ValidationError as exc:
            issues = [{"path": list(err["loc"]), "message": str(err["msg"])} for err in exc.errors()]
            raise CoordinatorError(400, "invalid_query", details={"issues": issues}) from None

    parse.query_model = model  # type: ignore[attr-defined]
    return Depends(parse)


class PageQuery(BaseModel):
    """Pagination (reference §2): newest first; `cursor` is the last id of the previous page."""

    limit: int = Field(default=100, ge=1, le=500, description="Page size, 1-500")
    cursor: QueryText | None = Field(default=None, description="An id of this list from `next_cursor`")


PageParams = Annotated[PageQuery, list_query(PageQuery)]

AT_DESCRIPTION = ("An RFC 3339 instant with its offset: the answer as it was then (the status history's "
                  "window: GET /zones/{zone_id}/history/window); 400 at_in_future / at_outside_history")


class AsOfQuery(BaseModel):
    at: AwareDatetime | None = Field(default=None, description=AT_DESCRIPTION)

    @field_validator("at", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        return None if value is None else parse_rfc3339(value)


class AsOfPageQuery(PageQuery, AsOfQuery):
    pass


AsOfParams = Annotated[AsOfQuery, list_query(AsOfQuery)]
AsOfPageParams = Annotated[AsOfPageQuery, list_query(AsOfPageQuery)]


async def checked_instant(svc: Services, at: datetime | None) -> datetime | None:
    """`at` when the status history answers for it (else 400), None for now."""
    if at is not None:
        async with svc.db.connection() as conn:
            await history.check_instant(conn, svc.settings, at)
    return at




# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def idempotency_headers(request: Request) -> tuple[str | None, bool]:
    key = parse_idempotency_key(request.headers.getlist("idempotency-key"))
    generated = request.headers.get("idempotency-key-kind", "").strip().lower() == "generated"
    return key, generated


def created(result: CreateResult) -> JSONResponse:
    headers = {"Idempotency-Replayed": "true"} if result.replayed else {}
    return JSONResponse(result.body, status_code=result.status, headers=headers)
