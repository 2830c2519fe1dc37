"""Delegation graph: edge creation, graph walks, revoke cascade, expiry (reference §4.18-4.23, §5.5, §6).

Walks are depth-bounded recursive SQL over `delegation_edges_walk (source_session_id, expires_at)
WHERE status = 'active'`, so each step is an index probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from rules.authority import explain_effective_authority, fold_effective_authority
from rules import lifecycle
from rules.errors import CoordinatorError
from rules.timefmt import iso_ms
from settings import Settings
from storage import history
from storage.db import XACT_LOCK_SQL, Conn, Database, at_commit, one, q, q1, q_batch
from storage.pages import Page, list_page
from storage.idempotency import CreateResult, IdempotencyRequest, find_receipt, inactive_result
from storage.event_feed import BUMP_EPOCH_SQL, DELEGATIONS_INVALIDATE, SESSIONS_REVOKE, Event, bump_epoch
from rules import workflow_contract as wc
from storage.sessions import edge_end_notices, terminate_subtree
from storage.notices import SNAPSHOT_COLUMNS, publish, session_notice

MAX_WALK_DEPTH = 10

EDGE_COLUMNS = """x.id, x.zone_id, x.source_session_id, x.target_session_id, x.issuer_application_id,
    x.receiver_application_id, x.parent_edge_id, x.resource_id, x.scopes, x.constraints_json, x.status,
    x.expires_at, x.edge_version, x.revoked_at, x.created_at"""

@dataclass
class CreateEdge:
    """A delegation create after its request checks (reference §4.18 steps 1-6, commands/delegations.py)."""

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


@dataclass(frozen=True)
class EdgeFilter:
    """Which edges of a zone a listing shows."""

    active: bool = False  # active and not yet expired
    source_session_id: str | None = None
    target_session_id: str | None = None
    at: datetime | None = None  # as of this instant (storage/history.py): edges created by then, in their status then


def _edges_at_sql() -> str:
    """The zone's edges as of an instant (params: at, zone, at): those created by then, `status`
    the one they had then; alias `x`, ready for more `AND` conditions."""
    columns = EDGE_COLUMNS.replace("x.status,", f"{history.status_at_sql('edge', 'x.id', '%s')} AS status,")
    return f"""SELECT x.* FROM (SELECT {columns} FROM delegation_edges x
                                WHERE x.zone_id = %s AND x.created_at <= %s) x WHERE x.status IS NOT NULL"""


def _as_of(project: Any) -> Any:
    def projected(row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != "revoked":
            row = dict(row, revoked_at=None)
        return project(row)
    return projected


async def list_edges(db: Database, zone_id: str, where: EdgeFilter, limit: int, cursor: str | None) -> Page:
    params: list[Any]
    if where.at is None:
        sql, params = f"SELECT {EDGE_COLUMNS} FROM delegation_edges x WHERE x.zone_id = %s", [zone_id]
        if where.active:
            sql += " AND x.status = 'active' AND x.expires_at > now()"
    else:
        sql, params = _edges_at_sql(), [where.at, zone_id, where.at]
        if where.active:
            sql += " AND x.status = 'active' AND x.expires_at > %s"
            params.append(where.at)
    for column in ("source_session_id", "target_session_id"):
        if getattr(where, column) is not None:
            sql += f" AND x.{column} = %s"
            params.append(getattr(where, column))
    project = active_projection if where.active else edge_projection
    return await list_page(db, table="delegation_edges", zone_id=zone_id, limit=limit, cursor=cursor, sql=sql,
                           params=params, project=project if where.at is None else _as_of(project))


async def active_inbound_edge(db: Database, zone_id: str, session_id: str, edge_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow(f"""SELECT {EDGE_COLUMNS} FROM delegation_edges x
                                WHERE x.zone_id = %s AND x.id = %s AND x.target_session_id = %s
                                  AND x.status = 'active' AND x.expires_at > now()""", (zone_id, edge_id, session_id))
    return None if row is None else edge_projection(row)


async def get_edge(conn: Conn, zone_id: str, edge_id: str) -> dict[str, Any] | None:
    return await q1(conn, f"SELECT {EDGE_COLUMNS} FROM delegation_edges x WHERE x.zone_id = %s AND x.id = %s",
                    (zone_id, edge_id))


async def replay_create(conn: Conn, settings: Settings, req: IdempotencyRequest, issuer: str) -> CreateResult | None:
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
    return CreateResult(receipt.response_status, receipt.response_json, replayed=True)


_RESOURCE_BY_ID_OR_IDENTIFIER = """
    SELECT id, identifier, scopes FROM resources WHERE zone_id = %s AND archived_at IS NULL
      AND (id = %s OR identifier = %s) ORDER BY (id = %s) DESC LIMIT 1"""
_RESOURCES_BY_IDENTIFIER = """
    SELECT id, identifier, scopes FROM resources WHERE zone_id = %s AND archived_at IS NULL AND identifier = ANY(%s)"""


@dataclass(frozen=True)
class CreateContext:
    """What a delegation create's checks read, under the zone's delegation lock."""

    now: Any  # the transaction's time: created_at, and what expiry is measured against
    endpoints: dict[str, dict[str, Any]]  # the delegation-endpoint-live sessions among source and target
    parents: list[dict[str, Any]]  # the source's active inbound edges, by id
    cycle: bool  # a live path leads from the target back to the source
    resource: dict[str, Any] | None  # the resource named by `resource_id` (by id or identifier)
    resources: list[dict[str, Any]]  # the resources named in constraints.resources


async def load_create_context(conn: Conn, cmd: CreateEdge) -> CreateContext:
    """Take the zone's delegation lock, then read everything the checks need in one round trip
    (each statement after the lock has a snapshot taken under it)."""
    wanted = list(dict.fromkeys(cmd.constraints.get("resources") or []))
    _, _, (clock,), endpoints, parents, (cycle,), resource, resources = await q_batch(
        conn,
        # Planned once per connection: these plans do not depend on the values (index lookups by id),
        # and planning the cycle walk and the endpoint lookup anew took 0.7 ms under the zone's lock.
        ("SET LOCAL plan_cache_mode = force_generic_plan", ()),
        (XACT_LOCK_SQL, (delegation_lock_key(cmd.zone_id),)),
        ("SELECT now() AS now", ()),
        (f"""SELECT {SNAPSHOT_COLUMNS} FROM sessions s WHERE s.zone_id = %s AND s.id = ANY(%s)
             AND {lifecycle.delegation_endpoint_live_sql("s")} FOR SHARE""",
         (cmd.zone_id, [cmd.source_session_id, cmd.target_session_id])),
        (f"""SELECT {EDGE_COLUMNS}, r.identifier AS resource_identifier
             FROM delegation_edges x LEFT JOIN resources r ON r.zone_id = x.zone_id AND r.id = x.resource_id
             WHERE x.zone_id = %s AND x.target_session_id = %s AND x.status = 'active'
               AND x.expires_at > now() ORDER BY x.id""", (cmd.zone_id, cmd.source_session_id)),
        (CYCLE_SQL, cycle_params(cmd.zone_id, cmd.source_session_id, cmd.target_session_id)),
        (_RESOURCE_BY_ID_OR_IDENTIFIER, (cmd.zone_id, cmd.resource_id, cmd.resource_id, cmd.resource_id)),
        (_RESOURCES_BY_IDENTIFIER, (cmd.zone_id, wanted)))
    return CreateContext(now=clock["now"], endpoints={r["id"]: r for r in endpoints}, parents=parents,
                         cycle=bool(cycle["cycle"]), resource=resource[0] if resource else None,
                         resources=resources)


async def write_edge(conn: Conn, row: dict[str, Any], constraints: dict[str, Any], context: CreateContext) -> None:
    """Insert the checked edge `row` (an `edge_projection` row): the insert and the epoch bump go
    with the COMMIT (no round trip of their own while the zone's lock is held), with its event and
    the notices to both endpoints."""
    await at_commit(conn, """
        INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
            receiver_application_id, parent_edge_id, resource_id, scopes, constraints_json, expires_at)
        VALUES (%(id)s, %(zone_id)s, %(source_session_id)s, %(target_session_id)s, %(issuer_application_id)s,
            %(receiver_application_id)s, %(parent_edge_id)s, %(resource_id)s, %(scopes)s, %(constraints)s,
            %(expires_at)s)""", dict(row, constraints=Jsonb(constraints)))
    await at_commit(conn, BUMP_EPOCH_SQL, (row["zone_id"],))
    edge_id, source, target = row["id"], row["source_session_id"], row["target_session_id"]
    scopes = ", ".join(row["scopes"]) or "no scopes"
    await publish(conn, row["zone_id"], [Event(DELEGATIONS_INVALIDATE, f"edge_create:{edge_id}", {
        "event": "edge_create", "zone_id": row["zone_id"], "edge_id": edge_id,
        "source_session_id": source, "target_session_id": target}, with_graph_epoch=True)], [
        session_notice(context.endpoints[source], wc.DELEGATION_GIVEN, f"gave edge {edge_id} to {target} ({scopes})",
                       edge_id=edge_id, peer_session_id=target),
        session_notice(context.endpoints[target], wc.DELEGATION_RECEIVED,
                       f"received edge {edge_id} from {source} ({scopes})", edge_id=edge_id, peer_session_id=source)])


def walk_sql(start: str, *, unexpired: bool = True) -> str:
    """The graph walk, written once: `WITH RECURSIVE walk` holds every path (id, source_session_id,
    target_session_id, depth, path) from the active edges `e` of zone %(zone)s that satisfy `start`
    along active edges, at most %(max)s deep, never through an edge twice. `unexpired`: only edges
    whose expiry has not passed (a revoke also walks edges past their expiry not yet settled)."""
    def active(a: str) -> str:
        return f"{a}.status = 'active'" + (f" AND {a}.expires_at > now()" if unexpired else "")
    return f"""
    WITH RECURSIVE walk AS (
        SELECT e.id, e.source_session_id, e.target_session_id, 1 AS depth, ARRAY[e.id] AS path
        FROM delegation_edges e
        WHERE e.zone_id = %(zone)s AND {start} AND {active("e")}
        UNION ALL
        SELECT n.id, n.source_session_id, n.target_session_id, w.depth + 1, w.path || n.id
        FROM walk w JOIN delegation_edges n ON n.source_session_id = w.target_session_id
        WHERE {active("n")} AND n.zone_id = %(zone)s AND NOT n.id = ANY(w.path) AND w.depth < %(max)s
    )"""


# §6.6: does a live path lead from the proposed target back to the proposed source? (column `cycle`)
CYCLE_SQL = walk_sql("e.source_session_id = %(target)s") + """
    SELECT EXISTS (SELECT 1 FROM walk WHERE target_session_id = %(source)s) AS cycle"""


def cycle_params(zone_id: str, source: str, target: str) -> dict[str, Any]:
    return {"zone": zone_id, "source": source, "target": target, "max": MAX_WALK_DEPTH}


WALK_SQL = walk_sql("e.id = %(edge)s")


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


async def effective_authority(conn: Conn, zone_id: str, session_id: str, *, at: datetime | None = None,
                              explain: bool = False) -> dict[str, Any]:
    """§6.1, now or as of `at` (edges created by then, in their status then, unexpired then);
    with `explain`, the reasons (rules.authority.explain_effective_authority)."""
    if at is None and not explain:
        parents = await q(conn, """
            SELECT x.id, x.scopes, x.resource_id, r.identifier AS resource_identifier, x.constraints_json, x.expires_at
            FROM delegation_edges x LEFT JOIN resources r ON r.zone_id = x.zone_id AND r.id = x.resource_id
            WHERE x.zone_id = %s AND x.target_session_id = %s AND x.status = 'active' AND x.expires_at > now()
            ORDER BY x.id""", (zone_id, session_id))
        return fold_effective_authority(session_id, [{**p, "scopes": list(p["scopes"])} for p in parents])
    instant = at if at is not None else one(await q1(conn, "SELECT now() AS now"))["now"]
    candidates = await q(conn, f"""
        SELECT x.id, x.scopes, x.resource_id, r.identifier AS resource_identifier, x.constraints_json, x.expires_at,
               x.source_session_id, x.parent_edge_id, h.status, h.reason AS status_reason,
               {history.status_at_sql('session', 'x.source_session_id', 'a.at')} AS source_status
        FROM (SELECT %(at)s::timestamptz AS at) a
        JOIN delegation_edges x ON x.zone_id = %(zone)s AND x.target_session_id = %(sid)s AND x.created_at <= a.at
        CROSS JOIN LATERAL {history.last_status_sql('edge', 'x.id', 'a.at', 'h.status, h.reason')} h
        LEFT JOIN resources r ON r.zone_id = x.zone_id AND r.id = x.resource_id
        ORDER BY x.id""", {"at": instant, "zone": zone_id, "sid": session_id})
    candidates = [{**c, "scopes": list(c["scopes"])} for c in candidates]
    live = [c for c in candidates if c["status"] == "active" and c["expires_at"] > instant]
    answer = fold_effective_authority(session_id, live)
    if not explain:
        return answer
    return {**answer, "explanation": explain_effective_authority(
        answer, candidates, await _parent_edges(conn, [c["id"] for c in candidates]), instant)}


async def _parent_edges(conn: Conn, edge_ids: list[str]) -> dict[str, str | None]:
    """edge id → parent edge id, for the edges and all their ancestors."""
    rows = await q(conn, """
        WITH RECURSIVE up AS (
            SELECT id, parent_edge_id, 1 AS depth FROM delegation_edges WHERE id = ANY(%(ids)s)
            UNION
            SELECT p.id, p.parent_edge_id, up.depth + 1 FROM up JOIN delegation_edges p ON p.id = up.parent_edge_id
            WHERE up.depth < %(max)s
        ) SELECT DISTINCT id, parent_edge_id FROM up""", {"ids": edge_ids, "max": 4 * MAX_WALK_DEPTH})
    return {r["id"]: r["parent_edge_id"] for r in rows}


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
    revoked = await q(conn, walk_sql("e.id = %(edge)s", unexpired=False) + f""",
        walked AS (SELECT id, min(depth) AS depth FROM walk GROUP BY id)
        UPDATE delegation_edges x SET status = 'revoked', revoked_at = now(), updated_at = now(),
            edge_version = x.edge_version + 1
        FROM walked WHERE x.id = walked.id AND x.status = 'active'
          AND {history.change_reason_sql("'revoked with the cascade of ' || %(edge)s::text")}
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
