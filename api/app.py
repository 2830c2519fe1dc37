"""The FastAPI application: middleware (request id, body limit, metrics), error mapping, routers,
and the lifespan that owns the Postgres pool, the Temporal client, the authenticator and the event
feed's listener.

No request leaves a broken connection: Starlette's outermost error middleware answers an unhandled
exception with the JSON 500 of `unexpected` and then re-raises it for the server's log, and the
server then drops the keep-alive connection (without `Connection: close`), so the client's next
request on it fails too. `ContainErrors` wraps the whole stack and keeps that exception from the
server once the answer is complete.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi import routing
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.auth import Authenticator
from api.deps import BEARER_SCHEME, Services, identity
from api.http import (
    InvalidBody, adopt_request_id, error_response, internal_error, invalid_body_response, validation_error_response,
)
from rules.errors import CoordinatorError
from settings import Settings, get_settings
from storage.db import Database, is_outage, postgres_unavailable

log = logging.getLogger("coordinator.api")


async def connect_temporal(settings: Settings):
    from temporalio.client import Client

    # Lazy: the API never waits on Temporal, and /ready reports it once it comes up.
    return await Client.connect(settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE, lazy=True)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """Build the app. Tests pass ready `services`; otherwise the lifespan creates them."""
    settings = settings or (services.settings if services else get_settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            app.state.services = services
            yield
            return
        db = Database(settings.DATABASE_URL, max_size=settings.DB_POOL_MAX, task_queue=settings.TEMPORAL_TASK_QUEUE,
                      statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS,
                      connect_timeout_s=settings.DB_CONNECTION_TIMEOUT_MS / 1000)
        await db.open(wait=False)
        client = await connect_temporal(settings)
        auth = Authenticator(settings, db)
        app.state.services = svc = Services(settings, db, client, auth)
        svc.feed.start()
        try:
            yield
        finally:
            await svc.feed.aclose()
            await auth.aclose()
            await db.close()

    app = CoordinatorAPI(title="Coordinator", version="0.1.0", lifespan=lifespan, description=DESCRIPTION)
    app.state.settings = settings
    if services is not None:  # tests drive the app without running its lifespan
        app.state.services = services

    # Added before `ConventionsMiddleware`, so they run inside it (request id set): rate limits, then audit.
    from api.audit import AuditMiddleware
    from api.ratelimit import RateLimitMiddleware

    app.add_middleware(AuditMiddleware)
    app.add_middleware(RateLimitMiddleware)

    app.add_middleware(ConventionsMiddleware)

    _add_error_handlers(app)
    _include_routers(app)
    return app


def _add_error_handlers(app: CoordinatorAPI) -> None:
    """Every error answers JSON `{"error": <code>, ...}`: ours, the body's and FastAPI's own."""
    @app.exception_handler(CoordinatorError)
    async def coordinator_error(request: Request, exc: CoordinatorError):
        return error_response(request, exc)

    @app.exception_handler(InvalidBody)
    async def invalid_body(request: Request, exc: InvalidBody):
        return invalid_body_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError):
        return validation_error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})  # 405 carries `Allow`
        if exc.status_code == 405:
            headers["Allow"] = app.allowed_methods(request.url.path) or headers.get("Allow", "")
        if exc.status_code == 404:
            return JSONResponse({"error": "not_found"}, status_code=404, headers=headers)
        if exc.status_code == 405:
            return JSONResponse({"error": "method_not_allowed"}, status_code=405, headers=headers)
        return internal_error(request, exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        if is_outage(exc):
            return error_response(request, postgres_unavailable())
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error(request, 500, "internal error")



def _include_routers(app: FastAPI) -> None:
    from api.routes import delegations, directory, health, invocations, services as service_routes, sessions

    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(service_routes.router)
    app.include_router(invocations.router)
    app.include_router(delegations.router)
    app.include_router(directory.router)
    from api.routes import events, ui, v1

    app.include_router(events.router)
    app.include_router(v1.router)
    ui.mount_inspector(app)


DESCRIPTION = """Runtime state of AI-agent authority: sessions, services, invocations and delegation edges,
on durable Temporal workflows.

**Authentication.** Zone routes take `Authorization: Bearer <mandate>` (an ES256 JWT of the zone with
the `agent:lifecycle` scope); the directory (`applications`, `resources`, `authority-records`),
`/metrics` and `/stats` take the operator token, which the read and admin routes also accept.
`/health`, `/ready` and `/v1/verify` are public.

**Bodies.** JSON (`application/json`), at most `COORDINATOR_BODY_LIMIT_BYTES` (413 beyond). A
`text/plain` or form body is not read (as if absent); any other media type is 415. JSON nested
deeper than 64 levels, non-finite numbers, and strings holding U+0000 or a lone surrogate are
refused with 400 `invalid_body`. Unknown body fields are ignored.

**Errors.** Every error is a JSON object with an `error` code. Validation failures: path ids →
400 `invalid_params`; query → 400 `invalid_query`; body → 400 `invalid_body` with
`error_description`, `requestId` and `details.issues`; malformed JSON, 413 and 415 →
`internal_error` with the status. A repeated query parameter takes its first value.
"""


def _depends_on(dependant: Dependant, call: Any) -> bool:
    return any(sub.call is call or _depends_on(sub, call) for sub in dependant.dependencies)


class CoordinatorAPI(FastAPI):
    """The app, with `ContainErrors` around the whole middleware stack."""

    def build_middleware_stack(self) -> ASGIApp:
        return ContainErrors(super().build_middleware_stack())

    def allowed_methods(self, path: str) -> str:
        """`Allow` of a 405: every method of every documented operation whose path matches (the
        router names only the first route it tried)."""
        table = getattr(self, "_allow_table", None)
        if table is None:
            table = [(re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"),
                      {method.upper() for method in item})
                     for template, item in self.openapi().get("paths", {}).items()]
            self._allow_table = table
        methods = set().union(*(methods for pattern, methods in table if pattern.match(path)))
        return ", ".join(sorted(methods))

    def openapi(self) -> dict[str, Any]:
        """FastAPI documents a 422 for every route with parameters; this API never sends one (its
        validation errors are the reference's 400s, documented on every route)."""
        if self.openapi_schema is None:
            schema = super().openapi()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            secured = {(context.path_format, method.lower()) for context in routing.iter_route_contexts(self.routes)
                       if isinstance(context.route, APIRoute) and _depends_on(context.route.dependant, identity)
                       for method in context.methods or ()}
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = BEARER_SCHEME
            for path, item in schema.get("paths", {}).items():
                for method, operation in item.items():
                    if (path, method) in secured:
                        operation["security"] = [{"bearer": []}]
            self.openapi_schema = schema
        return self.openapi_schema


class ContainErrors:
    """Outermost: an exception that escapes after a complete answer (Starlette's error middleware
    re-raises after sending the 500) is logged there and kept from the server, so the connection
    stays usable. One that escapes before any answer gets the JSON 500 here; one in the middle of
    a streamed answer must reach the server, which can only drop the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = complete = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if complete:
                return  # answered (and logged by the app's handler)
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error(Request(scope), 500, "internal error")(scope, receive, send)


class ConventionsMiddleware:
    """Request id, body-size and encoded-slash checks, and request metrics (plain ASGI: Starlette's
    BaseHTTPMiddleware would cost every request a task group and a body stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rid = adopt_request_id(request.headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        length = request.headers.get("content-length")
        raw_path = (scope.get("raw_path") or b"").split(b"?", 1)[0].lower()
        settings = scope["app"].state.settings
        try:
            if length and length.isdigit() and int(length) > settings.COORDINATOR_BODY_LIMIT_BYTES:
                await internal_error(request, 413, "Request body is too large")(scope, receive, send_with_id)
            elif raw_path.startswith(b"/zones/") and b"%2f" in raw_path:
                # An encoded slash sits inside an id segment (ids never contain "/"): reject it as the
                # path-param check would, instead of letting the decoded path pick another route.
                await error_response(request, CoordinatorError(400, "invalid_params"))(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            metrics.observe_request(Request(scope), status, time.perf_counter() - started)
