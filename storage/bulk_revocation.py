"""Bulk revocation: every active edge of a zone matching a filter, each with the revoke cascade
(reference §4.23 / §5.5), previewed or carried out in one transaction.

The preview and the revocation read the same statements (`preview`), so what a dry run answers is
what the real call does when the graph has not moved (its `epoch` says so): the matched edges, the
edges reachable from them (revoked with them), the live targets of those edges and their live
subtrees (terminated), and the other active edges of the terminated sessions (revoked with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from rules import lifecycle
from storage import history
from storage.db import XACT_LOCK_SQL, Conn, q, q1
from storage.delegations import MAX_WALK_DEPTH, current_epoch, delegation_lock_key, walk_sql
from storage.event_feed import DELEGATIONS_INVALIDATE, SESSIONS_REVOKE, Event, bump_epoch
from storage.notices import publish
from storage.sessions import edge_end_notices, subtree_sql, terminate_subtree


@dataclass(frozen=True)
class EdgeSelection:
    """Which active edges a bulk revoke takes; None matches anything. At least one is set."""

    issuer_application_id: str | None = None
    receiver_application_id: str | None = None
    resource_id: str | None = None  # a resource's row id or identifier (on the edge or in its constraints)
    scope: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None
    source_subtree_of: str | None = None  # edges whose source is the named session or one of its descendants

    def as_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.__dict__.items()
                if v is not None}


_MATCHED_SQL = """
    SELECT x.id FROM delegation_edges x
    WHERE x.zone_id = %(zone)s AND x.status = 'active' AND x.expires_at > now()
      AND (%(issuer)s::text IS NULL OR x.issuer_application_id = %(issuer)s)
      AND (%(receiver)s::text IS NULL OR x.receiver_application_id = %(receiver)s)
      AND (%(resource)s::text IS NULL OR x.resource_id = %(resource)s
           OR x.resource_id IN (SELECT r.id FROM resources r WHERE r.zone_id = %(zone)s AND r.identifier = %(resource)s)
           OR x.constraints_json -> 'resources' ? %(resource)s)
      AND (%(scope)s::text IS NULL OR %(scope)s = ANY(x.scopes))
      AND (%(before)s::timestamptz IS NULL OR x.created_at < %(before)s)
      AND (%(after)s::timestamptz IS NULL OR x.created_at >= %(after)s)
      AND (%(subtree)s::text IS NULL OR x.source_session_id IN (
           WITH RECURSIVE t AS (SELECT id FROM sessions WHERE zone_id = %(zone)s AND id = %(subtree)s
                                UNION SELECT s.id FROM t JOIN sessions s ON s.parent_id = t.id)
           SELECT id FROM t))
    ORDER BY x.id"""

# The edges reachable from the matched ones (the matched included), each with the matched edge it
# was first reached from.
_WALKED_SQL = walk_sql("e.id = ANY(%(roots)s)", unexpired=False) + """
    SELECT id, source_session_id, target_session_id, min(depth) AS depth,
           (array_agg(path[1] ORDER BY depth, path))[1] AS root
    FROM walk GROUP BY id, source_session_id, target_session_id ORDER BY min(depth), id"""

_TERMINATED_SQL = f"""
    WITH RECURSIVE {subtree_sql(lifecycle.SESSION_LIVE_SQL)}
    SELECT id FROM tree ORDER BY id"""

_TOUCHING_SQL = """
    SELECT id FROM delegation_edges
    WHERE zone_id = %(zone)s AND status = 'active' AND NOT (id = ANY(%(walked)s))
      AND (source_session_id = ANY(%(ids)s) OR target_session_id = ANY(%(ids)s))
    ORDER BY id"""


@dataclass
class Preview:
    epoch: int
    matched: list[str]
    walked: list[dict[str, Any]]  # id, source_session_id, target_session_id, depth, root
    targets: list[str]  # the live targets of walked edges, in walk order
    terminated: list[str]
    touching: list[str]  # the other active edges of the sessions it ends

    @property
    def downstream(self) -> list[str]:
        """The edges it revokes besides the matched ones."""
        matched = set(self.matched)
        return sorted({w["id"] for w in self.walked if w["id"] not in matched} | set(self.touching))

    @property
    def edge_count(self) -> int:
        return len(self.matched) + len(self.downstream)


async def preview(conn: Conn, zone_id: str, selection: EdgeSelection, *, lock: bool) -> Preview:
    """What revoking the selection takes. `lock`: under the zone's delegation lock (the real call)."""
    if lock:
        await conn.execute(XACT_LOCK_SQL, (delegation_lock_key(zone_id),))
    # The epoch first: a change committed during the reads makes it stale (see storage.delegations.impact).
    epoch = await current_epoch(conn, zone_id)
    matched = [r["id"] for r in await q(conn, _MATCHED_SQL, {
        "zone": zone_id, "issuer": selection.issuer_application_id, "receiver": selection.receiver_application_id,
        "resource": selection.resource_id, "scope": selection.scope, "before": selection.created_before,
        "after": selection.created_after, "subtree": selection.source_subtree_of})]
    if not matched:
        return Preview(epoch, [], [], [], [], [])
    walked = await q(conn, _WALKED_SQL, {"zone": zone_id, "roots": matched, "max": MAX_WALK_DEPTH})
    order = list(dict.fromkeys(w["target_session_id"] for w in walked))
    live = {r["id"] for r in await q(conn, f"""SELECT id FROM sessions WHERE zone_id = %s AND id = ANY(%s)
                                               AND status IN {lifecycle.SESSION_LIVE_SQL}""", (zone_id, order))}
    targets = [t for t in order if t in live]
    terminated = [r["id"] for r in await q(conn, _TERMINATED_SQL, {"zone": zone_id, "roots": targets})]
    touching = [r["id"] for r in await q(conn, _TOUCHING_SQL, {
        "zone": zone_id, "walked": [w["id"] for w in walked], "ids": terminated})] if terminated else []
    return Preview(epoch, matched, walked, targets, terminated, touching)


async def revoke(conn: Conn, zone_id: str, plan: Preview, *, revocation_id: str) -> dict[str, Any]:
    """Carry out `plan` (a `preview` taken under the lock, in this transaction): revoke the walked
    edges, end the targets' subtrees (which revokes their other edges), one epoch bump, an event for
    every revoked edge and the workflows' notices. What it did, with the counts."""
    revoked = await q(conn, f"""
        UPDATE delegation_edges x SET status = 'revoked', revoked_at = now(), updated_at = now(),
            edge_version = x.edge_version + 1
        WHERE x.zone_id = %(zone)s AND x.id = ANY(%(ids)s) AND x.status = 'active'
          AND {history.change_reason_sql("'bulk revocation ' || %(op)s::text")}
        RETURNING x.id, x.source_session_id, x.target_session_id""",
                      {"zone": zone_id, "ids": [w["id"] for w in plan.walked], "op": revocation_id})
    revoked.sort(key=lambda r: r["id"])
    ended = await terminate_subtree(conn, zone_id, plan.targets, "delegation_revoked") if plan.targets else []
    touching = [r["id"] for r in await q(conn, """
        SELECT id FROM delegation_edges WHERE id = ANY(%s) AND status = 'revoked' AND revoked_at = now()""",
                                         (plan.touching,))] if plan.touching else []
    notices = await edge_end_notices(conn, zone_id, revoked, f"revoked by bulk revocation {revocation_id}")
    epoch = await bump_epoch(conn, zone_id)
    root_of = {w["id"]: w["root"] for w in plan.walked}
    events = [Event(DELEGATIONS_INVALIDATE, f"bulk_revoke:{revocation_id}:{r['id']}", {
        "event": "edge_revoke", "zone_id": zone_id, "edge_id": r["id"], "reason": "bulk_revocation",
        "bulk_revocation_id": revocation_id, "matched_edge_id": root_of.get(r["id"]), "epoch": epoch})
        for r in revoked]
    subjects: dict[str, tuple[str, str]] = {}
    first_edge: dict[str, str] = {}
    for w in plan.walked:
        first_edge.setdefault(w["target_session_id"], w["root"])
    for row in ended:
        if row["id"] in first_edge:
            subjects.setdefault(row["subject_authority_record_id"], (row["id"], first_edge[row["id"]]))
    events += [Event(SESSIONS_REVOKE, f"bulk_revoke:{revocation_id}:subject:{record}", {
        "zone_id": zone_id, "session_id": record, "agent_session_id": session, "delegation_edge_id": edge_id,
        "reason": "delegation_revoked"}) for record, (session, edge_id) in subjects.items()]
    matched = set(plan.matched)
    matched_edges = [r["id"] for r in revoked if r["id"] in matched]
    downstream = sorted({r["id"] for r in revoked if r["id"] not in matched} | set(touching))
    terminated = sorted(r["id"] for r in ended)
    result: dict[str, Any] = {"matched_edges": matched_edges, "downstream_edges": downstream,
                              "terminated_sessions": terminated, "epoch": epoch}
    counts = {"matched": len(matched_edges), "downstream": len(downstream), "terminated_sessions": len(terminated)}
    await publish(conn, zone_id, events, notices)
    return {**result, "counts": counts}


async def record(conn: Conn, zone_id: str, revocation_id: str, *, actor: str | None, selection: EdgeSelection,
                 epoch_before: int, answer: dict[str, Any]) -> None:
    """The audit record of a bulk revocation: who, the filter, the counts, the epochs and its answer."""
    await conn.execute("""
        INSERT INTO bulk_revocations (id, zone_id, actor, filter_json, counts_json, answer_json, epoch_before,
                                      epoch_after)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                       (revocation_id, zone_id, actor, Jsonb(selection.as_json()), Jsonb(answer["counts"]),
                        Jsonb(answer), epoch_before, answer["epoch"]))


async def get_record(conn: Conn, zone_id: str, revocation_id: str) -> dict[str, Any] | None:
    return await q1(conn, "SELECT * FROM bulk_revocations WHERE zone_id = %s AND id = %s", (zone_id, revocation_id))
