"""The FastAPI application: middleware (request id, body limit, metrics), error mapping, routers,
and the lifespan that owns the Postgres pool, the Temporal client and the authenticator.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.auth import Authenticator
from api.deps import Services
from api.http import (
    InvalidBody, MalformedJson, adopt_request_id, error_response, internal_error, invalid_body_response,
)
from api.temporal_gateway import TemporalGateway
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
        app.state.services = Services(settings, db, TemporalGateway(client, settings), auth)
        try:
            yield
        finally:
            await auth.aclose()
            await db.close()

    app = FastAPI(title="Coordinator", version="0.1.0", lifespan=lifespan,
                  description="Runtime state of AI-agent authority: sessions, services, invocations and "
                              "delegation edges, on durable Temporal workflows.")
    app.state.settings = settings
    if services is not None:  # tests drive the app without running its lifespan
        app.state.services = services

    # Added before `ConventionsMiddleware`, so they run inside it (request id set): rate limits, then audit.
    from api.audit import AuditMiddleware
    from api.ratelimit import RateLimitMiddleware

    app.add_middleware(AuditMiddleware)
    app.add_middleware(RateLimitMiddleware)

    app.add_middleware(ConventionsMiddleware)

    @app.exception_handler(CoordinatorError)
    async def coordinator_error(request: Request, exc: CoordinatorError):
        return error_response(request, exc)

    @app.exception_handler(InvalidBody)
    async def invalid_body(request: Request, exc: InvalidBody):
        return invalid_body_response(request, exc)

    @app.exception_handler(MalformedJson)
    async def malformed_json(request: Request, exc: MalformedJson):
        return internal_error(request, 400, f"Body is not valid JSON: {exc}")

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError):
        return error_response(request, CoordinatorError(400, "invalid_params"))

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return JSONResponse({"error": "not_found"}, status_code=404)
        if exc.status_code == 405:
            return JSONResponse({"error": "method_not_allowed"}, status_code=405)
        return internal_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        if is_outage(exc):
            return error_response(request, postgres_unavailable())
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error(request, 500, "internal error")

    from api.routes import delegations, directory, health, invocations, services as service_routes, sessions

    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(service_routes.router)
    app.include_router(invocations.router)
    app.include_router(delegations.router)
    app.include_router(directory.router)
    from api.routes import events, v1

    app.include_router(events.router)
    app.include_router(v1.router)
    return app


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
