"""Per-process services and the dependencies shared by the routers, with their `Annotated` aliases
(the FastAPI template's habit): `Caller` (the authenticated caller of a zone route),
`ServicesDep` (the process's services) and `Operator` (the operator token; the directory router
takes it as a router-level dependency)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from api.auth import Authenticator, Identity
from api.http import path_ids
from feed.wakeups import ZoneWakeups
from rules.errors import CoordinatorError
from settings import Settings
from storage.db import ACTOR, Database


@dataclass
class Services:
    settings: Settings
    db: Database
    # The API's only handle on Temporal: `/ready` reports its state; no command waits on it
    # (commands reach the workflows through the workflow outbox). None: not configured.
    temporal: Client | None
    auth: Authenticator
    # Wakes the event feed's waiting readers when their zone's events commit (its listener starts
    # with the app, or with the first waiting reader).
    feed: ZoneWakeups = field(init=False)

    def __post_init__(self) -> None:
        self.feed = ZoneWakeups(self.db)


async def services(request: Request) -> Services:  # async: a sync dependency costs a thread hop
    return request.app.state.services


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1") if raw else request.url.path


# The bearer as OpenAPI documents it, on every operation that depends on `identity` (added by the
# app's openapi(): a security dependency would cost every request one more dependency to solve).
BEARER_SCHEME = {"type": "http", "scheme": "bearer",
                 "description": "A zone mandate (ES256 JWT with the agent:lifecycle scope), or the operator "
                                "token on the operator and admin routes."}


async def identity(request: Request) -> Identity:
    """Path ids first (400 invalid_params, no database access), then the bearer (reference §3.1)."""
    params = path_ids(request)
    svc = request.app.state.services
    ident = await svc.auth.authenticate(method=request.method, path=_raw_path(request),
                                        authorization=request.headers.get("authorization"),
                                        route_zone_id=params.get("zone_id"))
    if ident is None:
        raise CoordinatorError(401, "missing_token")
    request.state.identity = ident
    ACTOR.set(f"{ident.client_id}/{ident.subject}")  # named in the status history of what it changes
    return ident


async def operator(ident: Annotated[Identity, Depends(identity)]) -> Identity:
    """The operator token only (directory routes, /metrics, /stats)."""
    if not ident.operator:
        raise CoordinatorError(403, "operator_token_required")
    return ident


Caller = Annotated[Identity, Depends(identity)]
ServicesDep = Annotated[Services, Depends(services)]
Operator = Annotated[Identity, Depends(operator)]
