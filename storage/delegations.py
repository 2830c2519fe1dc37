"""Delegation graph: edge creation, graph walks, revoke cascade, expiry (reference §4.18-4.23, §5.5, §6).

Walks are depth-bounded recursive SQL over `delegation_edges_walk (source_session_id, expires_at)
WHERE status = 'active'`, so each step is an index probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg.types.json import Jsonb

from rules.authority import fold_effective_authority
from rules import lifecycle
from rules.errors import CoordinatorError
from rules.narrowing import check_narrowing
from rules.timefmt import iso_ms, parse_iso_z
from settings import Settings
from storage.db import XACT_LOCK_SQL, Conn, at_commit, q, q1, q_batch
from storage.idempotency import IdempotencyRequest, find_receipt, inactive_result, store_receipt
from storage.outbox import BUMP_EPOCH_SQL, DELEGATIONS_INVALIDATE, SESSIONS_REVOKE, Event, bump_epoch
from rules import workflow_contract as wc
from storage.sessions import edge_end_notices, terminate_subtree
from storage.workflow_outbox import SNAPSHOT_COLUMNS, publish, session_notice

MAX_WALK_DEPTH = 10

EDGE_COLUMNS = """x.id, x.zone_id, x.source_session_id, x.target_session_id, x.issuer_application_id,
    x.receiver_application_id, x.parent_edge_id, x.resource_id, x.scopes, x.constraints_json, x.status,
    x.expires_at, x.edge_version, x.revoked_at, x.created_at"""

# "delegation-endpoint-live" session (reference §4).
ENDPOINT_LIVE_SQL = """status = 'active' AND (
    (ttl_seconds IS NOT NULL AND started_at + make_interval(secs => ttl_seconds) > now())
    OR (lifecycle = 'service' AND heartbeat_deadline_at IS NOT NULL AND heartbeat_deadline_at > now()))"""


@dataclass
class CreateEdge:
    """A delegation create after the API's request checks (reference §4.18 steps 1-6)."""

    zone_id: str
    edge_id: str
    source_session_id: str
    target_session_id: str
    issuer_application_id: str
    receiver_application_id: str
    parent_edge_id: str | None
    resource_id: str | None
    scopes: list[str]
    constraints: dict[str, Any]
    requested_expires_at: str | None
    ttl_seconds: int | None
    body_ttl_seconds: int | None
    broad: bool


def delegation_lock_key(zone_id: str) -> str:
    """The zone's delegation lock (edge create and revoke serialise on it)."""
    return f"delegation:{zone_id}"


def jsonb_key_order(value: dict[str, Any]) -> dict[str, Any]:
    """`value`'s keys in the order Postgres returns a jsonb object's (shorter keys first, then by
    their UTF-8 bytes), so an answer built before the insert reads like one read back from it."""
    return dict(sorted(value.items(), key=lambda item: (len(item[0].encode()), item[0].encode())))


def edge_projection(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "zone_id": row["zone_id"], "source_session_id": row["source_session_id"],
            "target_session_id": row["target_session_id"], "issuer_application_id": row["issuer_application_id"],
            "receiver_application_id": row["receiver_application_id"], "parent_edge_id": row["parent_edge_id"],
            "resource_id": row["resource_id"], "scopes": list(row["scopes"]),
            "constraints_json": row["constraints_json"], "status": row["status"],
            "expires_at": iso_ms(row["expires_at"]), "edge_version": row["edge_version"],
            "revoked_at": iso_ms(row["revoked_at"]), "created_at": iso_ms(row["created_at"])}


def active_projection(row: dict[str, Any]) -> dict[str, Any]:
    body = edge_projection(row)
    constraints = row["constraints_json"] if isinstance(row["constraints_json"], dict) else {}
    body["broad_reason"] = constraints.get("broad_reason")
    return body


async def get_edge(conn: Conn, zone_id: str, edge_id: str) -> dict[str, Any] | None:
    return await q1(conn, f"SELECT {EDGE_COLUMNS} FROM delegation_edges x WHERE x.zone_id = %s AND x.id = %s",
                    (zone_id, edge_id))


async def replay_create(conn: Conn, settings: Settings, req: IdempotencyRequest, issuer: str) -> dict[str, Any] | None:
    """A repeated create answered from its receipt, only while the edge is live with the same issuer."""
    receipt = await find_receipt(conn, settings, req)
    if receipt is None:
        return None
    live = await q1(conn, """SELECT 1 FROM delegation_edges
                             WHERE zone_id = %s AND id = %s AND issuer_application_id = %s
                               AND status = 'active' AND expires_at > now()""",
                    (req.zone_id, receipt.resource_id, issuer))
    if live is None:
        raise inactive_result()
    return {"status": receipt.response_status, "body": receipt.response_json, "replayed": True}


async def _resolve_resources(conn: Conn, cmd: CreateEdge) -> tuple[str | None, list[dict[str, Any]]]:
    """§6.4: canonical resource id and the resolved resource rows (union by row id)."""
    rows: dict[str, dict[str, Any]] = {}
    canonical = None
    if cmd.resource_id is not None:
        row = await q1(conn, """SELECT id, identifier, scopes FROM resources WHERE zone_id = %s AND archived_at IS NULL
                                AND (id = %s OR identifier = %s) ORDER BY (id = %s) DESC LIMIT 1""",
                       (cmd.zone_id, cmd.resource_id, cmd.resource_id, cmd.resource_id))
        if row is None:
            raise CoordinatorError(404, "resource_not_found")
        canonical = row["id"]
        rows[row["id"]] = row
    wanted = list(dict.fromkeys(cmd.constraints.get("resources") or []))
    if wanted:
        found = await q(conn, """SELECT id, identifier, scopes FROM resources WHERE zone_id = %s AND archived_at IS NULL
                                 AND identifier = ANY(%s)""", (cmd.zone_id, wanted))
        if len(found) != len(wanted):
            raise CoordinatorError(404, "resource_not_found")
        if cmd.resource_id is not None and not any(cmd.resource_id in (r["id"], r["identifier"]) for r in found):
            raise CoordinatorError(400, "delegation_resource_scope_mismatch")
        for r in found:
            rows.setdefault(r["id"], r)
    return canonical, list(rows.values())


async def create_edge(conn: Conn, settings: Settings, cmd: CreateEdge,
                      idempotency: IdempotencyRequest | None) -> dict[str, Any]:
    """Steps 7-16 of §4.18 in one transaction. Idempotent for one edge id."""
    requested = parse_iso_z(cmd.requested_expires_at) if cmd.requested_expires_at else None
    if idempotency is not None:
        replay = await replay_create(conn, settings, idempotency, cmd.issuer_application_id)
        if replay is not None:
            return replay

    # The zone's delegation lock, then every read the checks need, in one round trip (each statement
    # after the lock has a snapshot taken under it); the checks then run in the reference's order.
    _, _, (clock,), endpoints, parents, (cycle,) = await q_batch(
        conn,
        # Planned once per connection: these plans do not depend on the values (index lookups by id),
        # and planning the cycle walk and the endpoint lookup anew took 0.7 ms under the zone's lock.
        ("SET LOCAL plan_cache_mode = force_generic_plan", ()),
        (XACT_LOCK_SQL, (delegation_lock_key(cmd.zone_id),)),
        ("SELECT now() AS now", ()),  # the transaction's time: created_at, and what expiry is measured against
        (f"""SELECT {SNAPSHOT_COLUMNS} FROM sessions s WHERE s.zone_id = %s AND s.id = ANY(%s)
             AND {ENDPOINT_LIVE_SQL} FOR SHARE""", (cmd.zone_id, [cmd.source_session_id, cmd.target_session_id])),
        (f"""SELECT {EDGE_COLUMNS}, r.identifier AS resource_identifier
             FROM delegation_edges x LEFT JOIN resources r ON r.zone_id = x.zone_id AND r.id = x.resource_id
             WHERE x.zone_id = %s AND x.target_session_id = %s AND x.status = 'active'
               AND x.expires_at > now() ORDER BY x.id""", (cmd.zone_id, cmd.source_session_id)),
        (CYCLE_SQL, cycle_params(cmd.zone_id, cmd.source_session_id, cmd.target_session_id)))
    by_id = {r["id"]: r for r in endpoints}
    apps = {r["id"]: r["application_id"] for r in endpoints}
    if cmd.source_session_id not in apps or cmd.target_session_id not in apps:
        raise CoordinatorError(404, "delegation_endpoint_not_found")
    if (apps[cmd.source_session_id] != cmd.issuer_application_id
            or apps[cmd.target_session_id] != cmd.receiver_application_id):
        raise CoordinatorError(409, "delegation_application_mismatch")

    resource_id, resolved = await _resolve_resources(conn, cmd)
    if resolved:
        allowed = {s for r in resolved for s in r["scopes"]}
        if not set(cmd.scopes) <= allowed:
            raise CoordinatorError(403, "delegation_scopes_exceed_resource")

    parent = None
    if parents:
        if cmd.parent_edge_id is not None:
            parent = next((p for p in parents if p["id"] == cmd.parent_edge_id), None)
            if parent is None:
                raise CoordinatorError(403, "parent_delegation_not_active")
        elif len(parents) > 1:
            raise CoordinatorError(409, "parent_delegation_ambiguous")
        else:
            parent = parents[0]
        narrowed = check_narrowing(
            {"scopes": list(parent["scopes"]), "expires_at": parent["expires_at"],
             "resource_id": parent["resource_id"], "constraints": parent["constraints_json"]},
            {"scopes": cmd.scopes, "requested_expires_at": requested, "resource_id": resource_id,
             "resolved_resource_ids": [r["id"] for r in resolved],
             "resolved_identifiers": [r["identifier"] for r in resolved],
             "constraints": cmd.constraints, "ttl_seconds": cmd.body_ttl_seconds})
        if not narrowed:
            raise CoordinatorError(403, "delegation_exceeds_parent_authority")

    if cycle["cycle"]:
        raise CoordinatorError(409, "delegation_cycle_denied")

    now = clock["now"]
    expires_at = requested if requested is not None else now + timedelta(seconds=cmd.ttl_seconds or 0)
    if not expires_at > now or (parent is not None and expires_at > parent["expires_at"]):
        if parent is not None:
            raise CoordinatorError(403, "delegation_exceeds_parent_authority")
        raise CoordinatorError(400, "delegation_expired")

    # Every check has passed: the edge and the epoch bump go with the COMMIT (no round trip of
    # their own while the zone's lock is held); the answer is built from what they write.
    row = {"id": cmd.edge_id, "zone_id": cmd.zone_id, "source_session_id": cmd.source_session_id,
           "target_session_id": cmd.target_session_id, "issuer_application_id": cmd.issuer_application_id,
           "receiver_application_id": cmd.receiver_application_id, "parent_edge_id": parent["id"] if parent else None,
           "resource_id": resource_id, "scopes": cmd.scopes, "constraints_json": jsonb_key_order(cmd.constraints),
           "status": "active", "expires_at": expires_at, "edge_version": 0, "revoked_at": None, "created_at": now}
    await at_commit(conn, """
        INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
            receiver_application_id, parent_edge_id, resource_id, scopes, constraints_json, expires_at)
        VALUES (%(id)s, %(zone_id)s, %(source_session_id)s, %(target_session_id)s, %(issuer_application_id)s,
            %(receiver_application_id)s, %(parent_edge_id)s, %(resource_id)s, %(scopes)s, %(constraints)s,
            %(expires_at)s)""", dict(row, constraints=Jsonb(cmd.constraints)))
    await at_commit(conn, BUMP_EPOCH_SQL, (cmd.zone_id,))

    body = edge_projection(row)
    body["delegation_edge_id"] = body.pop("id")
    scoped = resource_id is not None or bool(resolved)
    body["warnings"] = [] if scoped else ["resource_null_delegation_broadens_resource_matching"]
    body["allow_reason"] = ["same_zone_endpoints_active",
                            "resource_scope_checked" if scoped else "broad_delegation_elevated",
                            "parent_authority_narrowed" if parent else "source_authority_root",
                            "typed_constraints_validated"]
    body["effective_authority"] = {
        "source_session_id": cmd.source_session_id, "target_session_id": cmd.target_session_id,
        "parent_edge_id": parent["id"] if parent else None, "resource_id": resource_id,
        "resources": [r["identifier"] for r in resolved], "scopes": cmd.scopes,
        "expires_at": iso_ms(row["expires_at"]), "max_hops": cmd.constraints.get("max_hops", 1),
        "ttl_seconds": cmd.constraints.get("ttl_seconds"), "broad": resource_id is None and not resolved,
        "parent_edges_considered": [p["id"] for p in parents]}
    scopes = ", ".join(cmd.scopes) or "no scopes"
    await publish(conn, cmd.zone_id, [Event(DELEGATIONS_INVALIDATE, f"edge_create:{cmd.edge_id}", {
        "event": "edge_create", "zone_id": cmd.zone_id, "edge_id": cmd.edge_id,
        "source_session_id": cmd.source_session_id, "target_session_id": cmd.target_session_id},
        with_graph_epoch=True)], [
        session_notice(by_id[cmd.source_session_id], wc.DELEGATION_GIVEN,
                       f"gave edge {cmd.edge_id} to {cmd.target_session_id} ({scopes})",
                       edge_id=cmd.edge_id, peer_session_id=cmd.target_session_id),
        session_notice(by_id[cmd.target_session_id], wc.DELEGATION_RECEIVED,
                       f"received edge {cmd.edge_id} from {cmd.source_session_id} ({scopes})",
                       edge_id=cmd.edge_id, peer_session_id=cmd.source_session_id)])
    if idempotency is not None:
        await store_receipt(conn, settings, idempotency, resource_type="delegation_edge", resource_id=cmd.edge_id,
                            status=201, body=body)
    return {"status": 201, "body": body, "replayed": False}


# §6.6: does a live path lead from the proposed target back to the proposed source? (column `cycle`)
CYCLE_SQL = """
    WITH RECURSIVE walk AS (
        SELECT e.id, e.target_session_id, 1 AS depth, ARRAY[e.id] AS path
        FROM delegation_edges e
        WHERE e.zone_id = %(zone)s AND e.source_session_id = %(target)s
          AND e.status = 'active' AND e.expires_at > now()
        UNION ALL
        SELECT n.id, n.target_session_id, w.depth + 1, w.path || n.id
        FROM walk w JOIN delegation_edges n ON n.source_session_id = w.target_session_id
        WHERE n.status = 'active' AND n.expires_at > now() AND n.zone_id = %(zone)s
          AND NOT n.id = ANY(w.path) AND w.depth < %(max)s
    )
    SELECT EXISTS (SELECT 1 FROM walk WHERE target_session_id = %(source)s) AS cycle"""


def cycle_params(zone_id: str, source: str, target: str) -> dict[str, Any]:
    return {"zone": zone_id, "source": source, "target": target, "max": MAX_WALK_DEPTH}


WALK_SQL = """
    WITH RECURSIVE walk AS (
        SELECT e.id, e.source_session_id, e.target_session_id, 1 AS depth, ARRAY[e.id] AS path
        FROM delegation_edges e
        WHERE e.zone_id = %(zone)s AND e.id = %(edge)s AND e.status = 'active' AND e.expires_at > now()
        UNION ALL
        SELECT n.id, n.source_session_id, n.target_session_id, w.depth + 1, w.path || n.id
        FROM walk w JOIN delegation_edges n ON n.source_session_id = w.target_session_id
        WHERE n.status = 'active' AND n.expires_at > now() AND n.zone_id = %(zone)s
          AND NOT n.id = ANY(w.path) AND w.depth < %(max)s
    )
"""


async def traverse(conn: Conn, zone_id: str, edge_id: str) -> list[dict[str, Any]]:
    """§6.7: the live edges reachable from a live edge, by depth then id (rows repeat per path)."""
    return await q(conn, WALK_SQL + "SELECT id, source_session_id, target_session_id, depth FROM walk "
                                    "ORDER BY depth, id",
                   {"zone": zone_id, "edge": edge_id, "max": MAX_WALK_DEPTH})


async def impact(conn: Conn, zone_id: str, edge_id: str) -> dict[str, Any] | None:
    # The epoch is read BEFORE the walk: a graph change committed in between then makes the returned
    # epoch stale (a revoke with it answers 409 delegation_graph_changed). Read after the walk, a
    # change in between would pair the new epoch with the old preview and defeat expected_epoch.
    epoch = await current_epoch(conn, zone_id)
    rows = await traverse(conn, zone_id, edge_id)
    if not rows:
        return None
    targets = list(dict.fromkeys(r["target_session_id"] for r in rows))
    records = await q(conn, "SELECT id, subject_authority_record_id FROM sessions WHERE zone_id = %s AND id = ANY(%s)",
                      (zone_id, targets))
    by_session = {r["id"]: r["subject_authority_record_id"] for r in records}
    subjects = list(dict.fromkeys(by_session[t] for t in targets if by_session.get(t)))
    return {"edge_id": edge_id, "affected_edges": rows, "affected_sessions": targets,
            "affected_subject_sessions": subjects, "epoch": epoch}


async def effective_authority(conn: Conn, zone_id: str, session_id: str) -> dict[str, Any]:
    parents = await q(conn, """
        SELECT x.id, x.scopes, x.resource_id, r.identifier AS resource_identifier, x.constraints_json, x.expires_at
        FROM delegation_edges x LEFT JOIN resources r ON r.zone_id = x.zone_id AND r.id = x.resource_id
        WHERE x.zone_id = %s AND x.target_session_id = %s AND x.status = 'active' AND x.expires_at > now()
        ORDER BY x.id""", (zone_id, session_id))
    return fold_effective_authority(session_id, [{**p, "scopes": list(p["scopes"])} for p in parents])


async def current_epoch(conn: Conn, zone_id: str) -> int:
    row = await q1(conn, "SELECT epoch FROM delegation_graph_epochs WHERE zone_id = %s", (zone_id,))
    return int(row["epoch"]) if row else 0


async def revoke_cascade(conn: Conn, zone_id: str, edge_id: str, expected_epoch: int | None) -> dict[str, Any]:
    """§4.23 / §5.5 in one transaction: revoke the reachable edges and end their target sessions."""
    await conn.execute(XACT_LOCK_SQL, (delegation_lock_key(zone_id),))
    edge = await q1(conn, "SELECT id FROM delegation_edges WHERE zone_id = %s AND id = %s FOR UPDATE",
                    (zone_id, edge_id))
    if edge is None:
        raise CoordinatorError(404, "delegation_not_found")
    if expected_epoch is not None and expected_epoch != await current_epoch(conn, zone_id):
        raise CoordinatorError(409, "delegation_graph_changed")
    revoked = await q(conn, """
        WITH RECURSIVE walk AS (
            SELECT e.id, e.target_session_id, 1 AS depth, ARRAY[e.id] AS path
            FROM delegation_edges e WHERE e.zone_id = %(zone)s AND e.id = %(edge)s AND e.status = 'active'
            UNION ALL
            SELECT n.id, n.target_session_id, w.depth + 1, w.path || n.id
            FROM walk w JOIN delegation_edges n ON n.source_session_id = w.target_session_id
            WHERE n.status = 'active' AND n.zone_id = %(zone)s AND NOT n.id = ANY(w.path) AND w.depth < %(max)s
        ), walked AS (SELECT id, min(depth) AS depth FROM walk GROUP BY id)
        UPDATE delegation_edges x SET status = 'revoked', revoked_at = now(), updated_at = now(),
            edge_version = x.edge_version + 1
        FROM walked WHERE x.id = walked.id AND x.status = 'active'
        RETURNING x.id, x.source_session_id, x.target_session_id, walked.depth""",
                    {"zone": zone_id, "edge": edge_id, "max": MAX_WALK_DEPTH})
    if not revoked:
        raise CoordinatorError(404, "delegation_not_found")
    # UPDATE ... RETURNING has no defined order: targets (and so the "first occurrence" session named
    # in each authority record's revoke event, §5.5 step 6) follow the walk.
    revoked.sort(key=lambda r: (r["depth"], r["id"]))
    target_ids = list(dict.fromkeys(r["target_session_id"] for r in revoked))
    targets = await q(conn, f"""SELECT id, subject_authority_record_id FROM sessions
                                WHERE zone_id = %s AND id = ANY(%s) AND status IN {lifecycle.SESSION_LIVE_SQL}""",
                      (zone_id, target_ids))
    order = {sid: i for i, sid in enumerate(target_ids)}
    targets.sort(key=lambda t: order[t["id"]])
    changes = (await terminate_subtree(conn, zone_id, [t["id"] for t in targets], "delegation_revoked")
               if targets else [])
    # The endpoints still live after the cascade (sources, mostly) hear which edges they lost.
    notices = await edge_end_notices(conn, zone_id, revoked, f"revoked with the cascade of {edge_id}")
    epoch = await bump_epoch(conn, zone_id)
    events = [Event(DELEGATIONS_INVALIDATE, f"edge_revoke:{edge_id}", {
        "event": "edge_revoke", "zone_id": zone_id, "edge_id": edge_id, "affected_edges": len(revoked),
        "epoch": epoch})]
    subjects: dict[str, str] = {}
    for t in targets:
        subjects.setdefault(t["subject_authority_record_id"], t["id"])
    events += [Event(SESSIONS_REVOKE, f"delegation:{edge_id}:subject:{record}", {
        "zone_id": zone_id, "session_id": record, "agent_session_id": session, "delegation_edge_id": edge_id,
        "reason": "delegation_revoked"}) for record, session in subjects.items()]
    await publish(conn, zone_id, events, notices)
    return {"revoked_edges": len(revoked), "affected_sessions": len(subjects), "terminated_sessions": len(changes)}


async def expire_edges(conn: Conn, batch: int) -> int:
    """Settle lapsed edges: status expired; per zone one epoch bump and one `edge_expire` event."""
    rows = await q(conn, """
        UPDATE delegation_edges x SET status = 'expired', updated_at = now()
        FROM (SELECT id FROM delegation_edges WHERE status = 'active' AND expires_at <= now()
              ORDER BY expires_at, id LIMIT %s FOR UPDATE SKIP LOCKED) due
        WHERE x.id = due.id RETURNING x.id, x.zone_id, x.source_session_id, x.target_session_id""", (batch,))
    by_zone: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_zone.setdefault(r["zone_id"], []).append(r)
    for zone_id, edges in sorted(by_zone.items()):
        edges.sort(key=lambda e: e["id"])
        ids = [e["id"] for e in edges]
        notices = await edge_end_notices(conn, zone_id, edges, "expired")
        epoch = await bump_epoch(conn, zone_id)
        await publish(conn, zone_id, [Event(DELEGATIONS_INVALIDATE, f"edge_expire:{zone_id}:{epoch}", {
            "event": "edge_expire", "zone_id": zone_id, "affected_edges": len(ids), "edge_ids": sorted(ids),
            "epoch": epoch})], notices)
    return len(rows)


async def retention(conn: Conn, settings: Settings) -> dict[str, int]:
    """§9 retention: old revoked/expired edges, published outbox rows, expired receipts, old op results."""
    batch = settings.RETENTION_CLEANUP_BATCH_SIZE
    counts = {}
    for name, sql, params in (
        ("deleted_edges", """DELETE FROM delegation_edges WHERE id IN (
            SELECT id FROM delegation_edges WHERE status IN ('revoked', 'expired')
              AND COALESCE(revoked_at, expires_at, updated_at, created_at) < now() - make_interval(days => %s)
            LIMIT %s)""", (settings.DELEGATION_RETENTION_DAYS, batch)),
        ("deleted_outbox", """DELETE FROM caracal_outbox WHERE id IN (
            SELECT id FROM caracal_outbox WHERE producer = 'coordinator' AND status IN ('published', 'dead')
              AND updated_at < now() - make_interval(days => %s) LIMIT %s)""", (settings.OUTBOX_RETENTION_DAYS, batch)),
        ("deleted_idempotency_receipts", """DELETE FROM coordinator_idempotency_receipts WHERE id IN (
            SELECT id FROM coordinator_idempotency_receipts WHERE expires_at <= now()
            ORDER BY expires_at, id LIMIT %s)""",
         (batch,)),
        ("deleted_operation_results", """DELETE FROM operation_results WHERE op_id IN (
            SELECT op_id FROM operation_results WHERE created_at < now() - interval '1 day' LIMIT %s)""", (batch,)),
    ):
        cur = await conn.execute(sql, params)
        counts[name] = cur.rowcount
    return counts
