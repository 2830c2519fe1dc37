"""The v1 façade (reference §4.24) and `POST /v1/verify` (§4.25).

Each façade route authenticates its caller (like every non-public route), validates its own body
(400 invalid_body) and then re-dispatches one request into this same ASGI app: the zone route's
method and path, a JSON body built from the façade body, and the headers `authorization`
(verbatim), `x-request-id` (the outer id), `traceparent` and `idempotency-key` (when present;
`idempotency-key-kind` is not forwarded). That inner request runs the whole pipeline again:
request id, audit, routing, authentication (zone_mismatch and all), the zone route's handler and
its error mapping. So there is one code path per operation, and the façade answers with the inner
status and body (`Idempotency-Replayed` and `Retry-After` copied back; an inner 204 stays 204
with an empty body). The v1 rate limit runs before all that, in api/ratelimit.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import Body as BodyParam
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from api.deps import Caller, ServicesDep
from api.http import request_id
from api.ratelimit import INTERNAL_DISPATCH
from api.routes.common import ID_REGEX, Body, IdempotencyKeyHeader, Int, NonEmpty, error_responses, make_router
from rules.errors import CoordinatorError
from rules.timefmt import is_iso_z

router = make_router("v1")

# Ids that become path segments of the inner request must be ids (§2), or they could change its route.
PathId = Annotated[str, StringConstraints(pattern=ID_REGEX)]
ISO_Z = {"format": "date-time", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"}


class _Body(Body):
    pass


class BeginBody(_Body):
    zone_id: PathId
    application_id: NonEmpty
    subject_session_id: NonEmpty
    parent_id: NonEmpty | None = None
    lifecycle: Literal["task", "service"] | None = None
    labels: list[str] = Field(default_factory=list)
    ttl_seconds: Int | None = None
    metadata: dict[str, Any] | None = None

    def session_body(self, parent_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"application_id": self.application_id, "subject_session_id": self.subject_session_id,
                                "parent_id": parent_id, "labels": self.labels}
        supplied = self.model_fields_set
        if "lifecycle" in supplied and self.lifecycle is not None:
            body["lifecycle"] = self.lifecycle
        if self.ttl_seconds:  # only when truthy, as the reference
            body["ttl_seconds"] = self.ttl_seconds
        if "metadata" in supplied and self.metadata is not None:
            body["metadata"] = self.metadata
        return body


class SpawnChildBody(BeginBody):
    parent_agent_session_id: PathId


class EndBody(_Body):
    zone_id: PathId
    agent_session_id: PathId
    reason: str | None = Field(default=None, min_length=1, max_length=256)


class _EdgeBody(_Body):
    zone_id: PathId
    issuer_application_id: NonEmpty
    receiver_application_id: NonEmpty
    resource_id: NonEmpty | None = None
    scopes: list[str] = Field(default_factory=list)
    constraints_json: dict[str, Any] = Field(default_factory=dict)
    expires_at: Annotated[str, Field(json_schema_extra=ISO_Z)]

    @field_validator("expires_at")
    @classmethod
    def _iso(cls, value: str) -> str:
        if not is_iso_z(value):
            raise ValueError("Invalid ISO datetime")
        return value

    def edge_body(self, source: str, target: str) -> dict[str, Any]:
        return {"source_session_id": source, "target_session_id": target,
                "issuer_application_id": self.issuer_application_id,
                "receiver_application_id": self.receiver_application_id, "resource_id": self.resource_id,
                "scopes": self.scopes, "constraints_json": self.constraints_json, "expires_at": self.expires_at}


class ExchangeBody(_EdgeBody):
    source_session_id: NonEmpty
    target_session_id: NonEmpty


class DelegateToExistingBody(_EdgeBody):
    from_agent_session_id: NonEmpty
    to_agent_session_id: NonEmpty


class RevokeDelegationBody(_Body):
    zone_id: PathId
    delegation_edge_id: PathId


class VerifyBody(Body):
    zone_id: NonEmpty
    token: str | None = None
    authorization: str | None = None
    required_scope: str | None = None
    require_agent: bool | None = None
    require_delegation: bool | None = None


# ---------------------------------------------------------------------------------------------
# Internal re-dispatch
# ---------------------------------------------------------------------------------------------


class InnerResponse:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


def _inner_headers(request: Request, payload: bytes) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = [(b"host", (request.headers.get("host") or "localhost").encode("latin-1")),
                                          (b"accept", b"application/json"),
                                          (b"x-request-id", request_id(request).encode("latin-1"))]
    authorization = request.headers.get("authorization")
    if authorization is not None:
        headers.append((b"authorization", authorization.encode("latin-1")))
    traceparent = request.headers.get("traceparent")
    if traceparent is not None:
        headers.append((b"traceparent", traceparent.encode("latin-1")))
    for key in request.headers.getlist("idempotency-key"):
        headers.append((b"idempotency-key", key.encode("latin-1")))
    if payload:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    return headers


async def dispatch(request: Request, method: str, path: str, *, query: dict[str, str] | None = None,
                   body: dict[str, Any] | None = None) -> InnerResponse:
    """Run one request through the whole app (middleware, routing, handler) and collect its answer."""
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    root = request.scope.get("root_path", "")
    scope = {
        "type": "http",
        "asgi": request.scope.get("asgi", {"version": "3.0"}),
        "http_version": request.scope.get("http_version", "1.1"),
        "method": method,
        "scheme": request.scope.get("scheme", "http"),
        "server": request.scope.get("server"),
        "client": request.scope.get("client"),
        "root_path": root,
        "path": root + path,
        "raw_path": (root + path).encode("ascii"),
        "query_string": urlencode(query or {}).encode("ascii"),
        "headers": _inner_headers(request, payload),
        "state": {},
        "extensions": {INTERNAL_DISPATCH: True},
    }
    inner = InnerResponse()
    complete = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            inner.status = int(message["status"])
            inner.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            inner.body += message.get("body", b"")
            if not message.get("more_body", False):
                complete.set()

    try:
        await request.app(scope, receive, send)
    except Exception:
        # The app's outermost error middleware has already answered 500 and re-raises for the
        # server's log; that answer is the one to forward.
        if inner.status is None:
            raise
    finally:
        complete.set()
    if inner.status is None:
        raise RuntimeError(f"internal {method} {path} sent no response")
    return inner


def forward(inner: InnerResponse, *, replayed_header: bool) -> Response:
    headers: dict[str, str] = {}
    names = ("Retry-After", "Idempotency-Replayed") if replayed_header else ("Retry-After",)
    for name in names:
        value = inner.header(name)
        if value is not None:
            headers[name] = value
    if inner.status == 204 or not inner.body:
        return Response(status_code=inner.status or 500, headers=headers)
    return Response(bytes(inner.body), status_code=inner.status or 500, headers=headers,
                    media_type=inner.header("content-type") or "application/json")


def _zone_path(zone_id: str, *rest: str) -> str:
    # Ids (PathId) need no escaping but ":", which stays as it is: the inner route reads raw paths.
    return "/".join(["", "zones", quote(zone_id, safe=":"), *(quote(part, safe=":") for part in rest)])


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


async def _create_through(request: Request, zone_id: str, collection: str, body: dict[str, Any]) -> Response:
    """A façade create: POST the zone route's body to it, answer what it answers (replays marked)."""
    return forward(await dispatch(request, "POST", _zone_path(zone_id, collection), body=body), replayed_header=True)


@router.post("/v1/begin", status_code=201,
             summary="Start a root agent session (façade over POST /zones/:z/agents)")
async def begin(body: Annotated[BeginBody, BodyParam()], request: Request, ident: Caller,
                idempotency_key: IdempotencyKeyHeader = None) -> Response:
    return await _create_through(request, body.zone_id, "agents", body.session_body(body.parent_id))


@router.post("/v1/spawn-child", status_code=201,
             summary="Start a child agent session (façade over POST /zones/:z/agents)")
async def spawn_child(body: Annotated[SpawnChildBody, BodyParam()], request: Request, ident: Caller,
                      idempotency_key: IdempotencyKeyHeader = None) -> Response:
    return await _create_through(request, body.zone_id, "agents", body.session_body(body.parent_agent_session_id))


@router.post("/v1/end", status_code=204, response_class=Response,
             summary="Terminate a session (façade over DELETE /zones/:z/agents/:id)")
async def end(body: Annotated[EndBody, BodyParam()], request: Request, ident: Caller) -> Response:
    query = {"reason": body.reason} if body.reason is not None else None
    inner = await dispatch(request, "DELETE", _zone_path(body.zone_id, "agents", body.agent_session_id), query=query)
    return forward(inner, replayed_header=False)


@router.post("/v1/exchange", status_code=201,
             summary="Create a delegation edge (façade over POST /zones/:z/delegations)")
async def exchange(body: Annotated[ExchangeBody, BodyParam()], request: Request, ident: Caller,
                   idempotency_key: IdempotencyKeyHeader = None) -> Response:
    return await _create_through(request, body.zone_id, "delegations",
                                 body.edge_body(body.source_session_id, body.target_session_id))


@router.post("/v1/delegate-to-existing-agent", status_code=201,
             summary="Delegate to an existing session (façade over POST /zones/:z/delegations)")
async def delegate_to_existing_agent(body: Annotated[DelegateToExistingBody, BodyParam()], request: Request,
                                     ident: Caller, idempotency_key: IdempotencyKeyHeader = None) -> Response:
    inner = await dispatch(request, "POST", _zone_path(body.zone_id, "delegations"),
                           body=body.edge_body(body.from_agent_session_id, body.to_agent_session_id))
    return forward(inner, replayed_header=True)


@router.post("/v1/revoke-delegation",
             summary="Revoke a delegation edge (façade over PATCH /zones/:z/delegations/:id/revoke)")
async def revoke_delegation(body: Annotated[RevokeDelegationBody, BodyParam()], request: Request,
                            ident: Caller) -> Response:
    inner = await dispatch(request, "PATCH",
                           _zone_path(body.zone_id, "delegations", body.delegation_edge_id, "revoke"))
    return forward(inner, replayed_header=False)


def _raw_token(body: VerifyBody) -> str | None:
    if body.token:
        return body.token
    authorization = body.authorization
    if authorization and authorization.startswith("Bearer "):
        authorization = authorization[len("Bearer "):].strip()
    return authorization or None


class VerifyAnswer(BaseModel):
    """`{"valid": true, "claims": {…}}`, or `{"valid": false, "error"}` with 400/401/429."""

    model_config = ConfigDict(extra="allow")

    valid: bool
    error: str | None = None
    claims: dict[str, Any] | None = None


@router.post("/v1/verify", summary="Verify a mandate for a zone (public)", response_model=VerifyAnswer,
             responses={**error_responses(400, 413, 415),
                        401: {"model": VerifyAnswer, "description": "`token_invalid`"},
                        429: {"model": VerifyAnswer, "description": "`rate_limited`"}})
async def verify(body: Annotated[VerifyBody, BodyParam()], svc: ServicesDep) -> Response:
    token = _raw_token(body)
    if token is None:
        return JSONResponse({"valid": False, "error": "missing_token"}, status_code=400)
    try:
        claims = await svc.auth.verify_mandate(token, body.zone_id, body.required_scope, bool(body.require_agent),
                                               bool(body.require_delegation))
    except CoordinatorError as exc:
        if exc.code != "token_invalid":
            raise
        return JSONResponse({"valid": False, "error": "token_invalid"}, status_code=401)
    return JSONResponse({"valid": True, "claims": claims})
