"""/v1/verify claim rules (§4.25.1): what a mandate must carry, and the camelCase claims the route
answers. A failed rule raises `InvalidToken`; the authenticator answers 401 token_invalid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from api.auth.bearer import InvalidToken, non_empty_str

VERIFY_REQUIRED: Final = ("exp", "iat", "jti", "sub", "client_id", "sid", "root_sid", "use", "sub_type")
MAX_HOP_COUNT: Final = 10
_STRING_CLAIMS: Final = ("jti", "sub", "client_id", "sid", "root_sid", "use", "sub_type")
_OPTIONAL_IDS: Final = (("agent_session_id", "agentSessionId"), ("delegation_edge_id", "delegationEdgeId"),
                        ("source_session_id", "sourceSessionId"), ("target_session_id", "targetSessionId"))


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise InvalidToken(reason)


def _check_verify_claims(claims: Mapping[str, Any], zone_id: str) -> None:
    for name in _STRING_CLAIMS:
        _require(non_empty_str(claims.get(name)), f"{name} must be a non-empty string")
    _require(claims["use"] in ("session", "resource"), "use must be session or resource")
    _require(claims["sub_type"] in ("user", "application"), "sub_type must be user or application")
    _require(_non_negative_int(claims.get("iat")) and _non_negative_int(claims.get("exp")),
             "iat/exp must be non-negative integers")
    _require(isinstance(claims.get("scope") or "", str), "scope must be a string")
    _require(claims.get("zone_id") == zone_id, "zone_invalid")
    target = claims.get("target")
    _require(target is None or (isinstance(target, list) and all(non_empty_str(t) for t in target)),
             "target must be an array of non-empty strings")
    hop_count = claims.get("hop_count")
    _require(hop_count is None or (_non_negative_int(hop_count) and hop_count <= MAX_HOP_COUNT),
             "hop_count invalid or too large")
    epoch = claims.get("delegation_graph_epoch")
    _require(epoch is None or _non_negative_int(epoch), "delegation_graph_epoch must be a non-negative integer")
    chain = claims.get("delegation_chain")
    _require(chain is None or (isinstance(chain, list) and all(
        isinstance(hop, Mapping) and non_empty_str(hop.get("application_id")) for hop in chain)),
        "delegation_chain entries need an application_id")
    path = claims.get("delegation_path")
    _require(path is None or (isinstance(path, list) and all(isinstance(p, str) for p in path)),
             "delegation_path must be an array of strings")


def _chain_hop(hop: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"applicationId": hop["application_id"]}
    if non_empty_str(hop.get("agent_session_id")):
        out["agentSessionId"] = hop["agent_session_id"]
    if non_empty_str(hop.get("delegation_edge_id")):
        out["delegationEdgeId"] = hop["delegation_edge_id"]
    return out


def mandate_claims(claims: Mapping[str, Any], zone_id: str, required_scope: str | None,
                         require_agent: bool, require_delegation: bool) -> dict[str, Any]:
    _check_verify_claims(claims, zone_id)
    scope: str = claims.get("scope") or ""
    _require(not required_scope or required_scope in scope.split(), "required scope missing")
    _require(not require_agent or non_empty_str(claims.get("agent_session_id")), "agent required")
    _require(not require_delegation or non_empty_str(claims.get("delegation_edge_id")), "delegation required")
    out: dict[str, Any] = {
        "sub": claims["sub"], "zoneId": claims["zone_id"], "clientId": claims["client_id"],
        "sid": claims["sid"], "rootSid": claims["root_sid"], "use": claims["use"], "subType": claims["sub_type"],
        "jti": claims["jti"], "issuedAt": claims["iat"], "expiresAt": claims["exp"], "scope": scope,
    }
    if claims.get("target") is not None:
        out["targetResources"] = list(claims["target"])
    for claim, field in _OPTIONAL_IDS:
        if non_empty_str(claims.get(claim)):
            out[field] = claims[claim]
    if claims.get("delegation_path") is not None:
        out["delegationPath"] = list(claims["delegation_path"])
    if claims.get("delegation_chain") is not None:
        out["delegationChain"] = [_chain_hop(hop) for hop in claims["delegation_chain"]]
    if claims.get("delegation_graph_epoch") is not None:
        out["graphEpoch"] = claims["delegation_graph_epoch"]
    if claims.get("hop_count") is not None:
        out["hopCount"] = claims["hop_count"]
    return out
