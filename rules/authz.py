"""Authorization vocabulary (§3.2).

An identity is any object with `client_id: str` and `scopes` (a set, frozenset or list of exact
scope strings). `coordinator.admin` is deliberately NOT enough to start sessions, register services
or issue delegations (reference quirk kept, §14).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol


class Identity(Protocol):
    @property
    def client_id(self) -> str: ...

    @property
    def scopes(self) -> Collection[str]: ...


SCOPE_ADMIN = "coordinator.admin"
SCOPE_DELEGATE_BROAD = "coordinator.delegate_broad"
PREFIX_SPAWN_FOR = "coordinator.spawn_for:"
PREFIX_SPAWN_UNDER = "coordinator.spawn_under:"
PREFIX_DELEGATE_FROM = "coordinator.delegate_from:"
PREFIX_DELEGATE_TO = "coordinator.delegate_to:"
PREFIX_DELEGATE_BROAD = "coordinator.delegate_broad:"
PREFIX_INVOKE_FROM = "coordinator.invoke_from:"


def spawn_for(app: str) -> str:
    return PREFIX_SPAWN_FOR + app


def spawn_under(app: str) -> str:
    return PREFIX_SPAWN_UNDER + app


def delegate_from(app: str) -> str:
    return PREFIX_DELEGATE_FROM + app


def delegate_to(app: str) -> str:
    return PREFIX_DELEGATE_TO + app


def delegate_broad_for(app: str) -> str:
    return PREFIX_DELEGATE_BROAD + app


def invoke_from(app: str) -> str:
    return PREFIX_INVOKE_FROM + app


def has_scope(identity: Identity, scope: str) -> bool:
    return scope in (identity.scopes or ())


def owns(identity: Identity, app: str) -> bool:
    return bool(identity.client_id) and identity.client_id == app


def is_admin(identity: Identity) -> bool:
    return has_scope(identity, SCOPE_ADMIN)


def can_start_for(identity: Identity, app: str) -> bool:
    """Start a session for `app` (403 application_ownership_required)."""
    return owns(identity, app) or has_scope(identity, spawn_for(app))


def can_spawn_under(identity: Identity, parent_app: str) -> bool:
    """Start under a parent of another application (403 parent_ownership_required)."""
    return has_scope(identity, spawn_under(parent_app))


def can_manage_session(identity: Identity, app: str) -> bool:
    """Suspend / resume / terminate / heartbeat (403 application_ownership_required)."""
    return owns(identity, app) or is_admin(identity) or has_scope(identity, spawn_for(app))


def can_register_service(identity: Identity, app: str) -> bool:
    """Register a service for `app` (403 application_ownership_required)."""
    return owns(identity, app) or has_scope(identity, spawn_for(app))


def can_issue(identity: Identity, issuer: str) -> bool:
    """Create a delegation as `issuer` (403 issuer_ownership_required)."""
    return owns(identity, issuer) or has_scope(identity, delegate_from(issuer))


def can_receive(identity: Identity, receiver: str, issuer: str | None = None) -> bool:
    """Receiver consent (403 receiver_consent_required); only asked when receiver != issuer,
    which passing `issuer` checks here."""
    if issuer is not None and receiver == issuer:
        return True
    return owns(identity, receiver) or has_scope(identity, delegate_to(receiver)) or is_admin(identity)


def can_delegate_broad(identity: Identity, issuer: str) -> bool:
    """Resource-less delegation (403 broad_delegation_permission_required)."""
    return (
        is_admin(identity)
        or has_scope(identity, SCOPE_DELEGATE_BROAD)
        or has_scope(identity, delegate_broad_for(issuer))
    )


def can_revoke(identity: Identity, issuer: str) -> bool:
    """Revoke an edge issued by `issuer` (403 issuer_ownership_required)."""
    return owns(identity, issuer) or has_scope(identity, delegate_from(issuer)) or is_admin(identity)


def can_invoke(identity: Identity, app: str) -> bool:
    """Create an invocation from `app`, or start/cancel/complete one on a service of `app`
    (403 invoker_ownership_required)."""
    return owns(identity, app) or has_scope(identity, invoke_from(app)) or is_admin(identity)


def can_bulk_revoke(identity: Identity) -> bool:
    """A bulk revocation crosses applications: coordinator.admin (the operator token carries it)."""
    return is_admin(identity)
