"""rules.authz: §3.2 vocabulary, including where coordinator.admin is not enough."""

from dataclasses import dataclass, field

from rules import authz
from rules.authz import (
    can_delegate_broad,
    can_invoke,
    can_issue,
    can_manage_session,
    can_receive,
    can_register_service,
    can_revoke,
    can_spawn_under,
    can_start_for,
    is_admin,
    owns,
)


@dataclass
class Ident:
    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)


def ident(client_id: str, *scopes: str) -> Ident:
    return Ident(client_id, frozenset(scopes))


ADMIN = "coordinator.admin"


def test_scope_constants() -> None:
    assert authz.SCOPE_ADMIN == ADMIN
    assert authz.SCOPE_DELEGATE_BROAD == "coordinator.delegate_broad"
    assert authz.spawn_for("a") == "coordinator.spawn_for:a"
    assert authz.spawn_under("a") == "coordinator.spawn_under:a"
    assert authz.delegate_from("a") == "coordinator.delegate_from:a"
    assert authz.delegate_to("a") == "coordinator.delegate_to:a"
    assert authz.delegate_broad_for("a") == "coordinator.delegate_broad:a"
    assert authz.invoke_from("a") == "coordinator.invoke_from:a"


def test_owns_and_admin() -> None:
    assert owns(ident("app-1"), "app-1")
    assert not owns(ident("app-2"), "app-1")
    assert not owns(ident(""), "")
    assert is_admin(ident("x", ADMIN))
    assert not is_admin(ident("x", "coordinator.admin:app"))


def test_case_22_start_for() -> None:
    assert can_start_for(ident("app-1"), "app-1")
    assert not can_start_for(ident("app-2", ADMIN), "app-1")  # admin not enough
    assert can_start_for(ident("app-2", "coordinator.spawn_for:app-1"), "app-1")
    assert not can_start_for(ident("app-2", "coordinator.spawn_for:app-3"), "app-1")


def test_case_34_spawn_under() -> None:
    assert not can_spawn_under(ident("app-1", ADMIN), "parent-app")
    assert not can_spawn_under(ident("parent-app"), "parent-app")  # ownership is not the scope
    assert can_spawn_under(ident("app-1", "coordinator.spawn_under:parent-app"), "parent-app")


def test_manage_session() -> None:
    assert can_manage_session(ident("app-1"), "app-1")
    assert can_manage_session(ident("caracal-operator", "agent:lifecycle", ADMIN), "app-1")
    assert can_manage_session(ident("x", "coordinator.spawn_for:app-1"), "app-1")
    assert not can_manage_session(ident("x", "coordinator.invoke_from:app-1"), "app-1")


def test_register_service() -> None:
    assert can_register_service(ident("app-1"), "app-1")
    assert can_register_service(ident("x", "coordinator.spawn_for:app-1"), "app-1")
    assert not can_register_service(ident("x", ADMIN), "app-1")


def test_cases_78_79_issue_and_receive() -> None:
    assert can_issue(ident("issuer"), "issuer")
    assert can_issue(ident("x", "coordinator.delegate_from:issuer"), "issuer")
    assert not can_issue(ident("x", ADMIN), "issuer")
    issuer_owner = ident("issuer")
    assert not can_receive(issuer_owner, "receiver")
    assert can_receive(issuer_owner, "receiver", issuer="receiver")  # R == I needs no consent
    assert can_receive(issuer_owner, "issuer", "issuer")
    assert can_receive(ident("issuer", "coordinator.delegate_to:receiver"), "receiver", "issuer")
    assert can_receive(ident("issuer", ADMIN), "receiver", "issuer")
    assert can_receive(ident("receiver"), "receiver", "issuer")


def test_case_82_broad() -> None:
    only_pair = ident("x", "coordinator.delegate_from:i", "coordinator.delegate_to:r")
    assert not can_delegate_broad(only_pair, "i")
    assert can_delegate_broad(ident("x", ADMIN), "i")
    assert can_delegate_broad(ident("x", "coordinator.delegate_broad"), "i")
    assert can_delegate_broad(ident("x", "coordinator.delegate_broad:i"), "i")
    assert not can_delegate_broad(ident("x", "coordinator.delegate_broad:other"), "i")
    assert not can_delegate_broad(ident("i"), "i")  # owning the issuer is not enough


def test_case_98_revoke() -> None:
    assert can_revoke(ident("i"), "i")
    assert can_revoke(ident("x", "coordinator.delegate_from:i"), "i")
    assert can_revoke(ident("x", ADMIN), "i")
    assert not can_revoke(ident("x", "coordinator.delegate_to:i"), "i")


def test_case_71_invoke() -> None:
    assert can_invoke(ident("s"), "s")
    assert can_invoke(ident("x", "coordinator.invoke_from:s"), "s")
    assert can_invoke(ident("x", ADMIN), "s")
    assert not can_invoke(ident("x", "coordinator.spawn_for:s"), "s")


def test_scopes_as_list_or_set() -> None:
    class ListIdent:
        client_id = "x"
        scopes = ["coordinator.spawn_for:app-1"]

    class SetIdent:
        client_id = "x"
        scopes = {ADMIN}

    assert can_start_for(ListIdent(), "app-1")
    assert is_admin(SetIdent())
    assert not is_admin(ListIdent())
