"""The authenticated caller (§3.1 step 12)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

OPERATOR: Final = "caracal-operator"
ADMIN_SCOPE: Final = "coordinator.admin"


@dataclass(frozen=True)
class Identity:
    """The authenticated caller (§3.1 step 12). `session_id` is the token's `agent_session_id`;
    `authority_record_id` is its `sid`. Operator identities have no authority record."""

    zone_id: str
    scopes: frozenset[str]
    subject: str
    client_id: str
    session_id: str | None = None
    delegation_edge_id: str | None = None
    authority_record_id: str | None = None
    operator: bool = False


def operator_identity(zone_id: str, coordinator_scope: str) -> Identity:
    return Identity(zone_id=zone_id, scopes=frozenset({coordinator_scope, ADMIN_SCOPE}), subject=OPERATOR,
                    client_id=OPERATOR, operator=True)
