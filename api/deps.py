"""Per-process services and the authentication dependency shared by the routers."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from api.auth import Authenticator, Identity
from api.http import path_ids
from api.temporal_gateway import TemporalGateway
from rules.errors import CoordinatorError
from settings import Settings
from storage.db import Database


@dataclass
class Services:
    settings: Settings
    db: Database
    temporal: TemporalGateway
    auth: Authenticator


async def services(request: Request) -> Services:  # async: a sync dependency costs a thread hop
    return request.app.state.services


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1") if raw else request.url.path


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
    return ident


async def operator(request: Request) -> Identity:
    """Directory routes: the operator token only."""
    ident = await identity(request)
    if not ident.operator:
        raise CoordinatorError(403, "operator_token_required")
    return ident
