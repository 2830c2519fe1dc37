"""Seed a large delegation graph directly in Postgres (creating 10,000 edges through the API takes
minutes). Schema-specific: our `sessions` and `delegation_edges` tables (storage/migrations).

The shape, meant to be realistic and to keep the walks bounded:
- half the sessions are "coordinators" forming delegation trees: a few roots, each with one chain
  down to depth 9 and the rest attached to a uniformly random coordinator above depth 9 (random
  recursive trees: a few wide levels near the roots, long thin tails);
- the other half are "workers" that receive edges from several coordinators each, and delegate
  no further. Chains are at most 10 edges long (depth 9 coordinator → worker), the graph has no
  cycle, and a walk from an edge reaches each edge below it once (workers have no outbound edges),
  so impact answers are as large as the subtree, not exponential in it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

MAX_LEVEL = 9  # coordinators live at levels 0..9; a worker edge from level 9 is the 10th hop


@dataclass
class Graph:
    sessions: int
    edges: int
    roots: int
    coordinators: int
    tree_edges: int
    worker_edges: int
    max_depth: int
    root_edges: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "edges": self.edges, "roots": self.roots,
                "coordinators": self.coordinators, "tree_edges": self.tree_edges,
                "worker_edges": self.worker_edges, "max_depth": self.max_depth,
                "root_edges": len(self.root_edges)}


def _new_id() -> str:
    try:
        import uuid_utils

        return str(uuid_utils.uuid7())
    except ImportError:  # pragma: no cover
        import uuid

        return str(uuid.uuid4())


def plan_graph(sessions: int, edges: int, seed: int = 1) -> tuple[list[int], list[int | None], list[tuple[int, int]]]:
    """Levels and tree parents of the coordinators, and the (coordinator, worker) worker edges.
    Session indexes: coordinators 0..C-1, workers C..sessions-1."""
    rng = random.Random(seed)
    coordinators = max(2, sessions // 2)
    workers = max(1, sessions - coordinators)
    roots = max(1, coordinators // 250)
    level: list[int] = [0] * roots
    parent: list[int | None] = [None] * roots
    for r in range(roots):  # one chain to the bottom level per root
        prev = r
        for lvl in range(1, MAX_LEVEL + 1):
            if len(level) >= coordinators:
                break
            level.append(lvl)
            parent.append(prev)
            prev = len(level) - 1
    while len(level) < coordinators:
        p = rng.randrange(len(level))
        if level[p] < MAX_LEVEL:
            level.append(level[p] + 1)
            parent.append(p)
    tree_edges = coordinators - roots
    wanted = max(0, min(edges - tree_edges, coordinators * workers))
    pairs: set[tuple[int, int]] = set()
    ordered: list[tuple[int, int]] = []
    for c in range(coordinators):  # every bottom coordinator delegates to one worker: 10-hop chains
        if level[c] == MAX_LEVEL and len(ordered) < wanted:
            pair = (c, coordinators + rng.randrange(workers))
            pairs.add(pair)
            ordered.append(pair)
    while len(ordered) < wanted:
        pair = (rng.randrange(coordinators), coordinators + rng.randrange(workers))
        if pair not in pairs:
            pairs.add(pair)
            ordered.append(pair)
    return level, parent, ordered


async def seed_graph(database_url: str, zone_id: str, app: str, resource_id: str, record_id: str, *,
                     edges: int, sessions: int) -> Graph:
    """Insert the sessions and edges of `plan_graph` into `zone_id` (which must already exist with
    `app`, `resource_id` and `record_id`), bump the zone's graph epoch, and ANALYZE."""
    import psycopg
    from psycopg.types.json import Jsonb

    level, parent, worker_pairs = plan_graph(sessions, edges)
    coordinators = len(level)
    n_sessions = max(coordinators + 1, sessions)
    ids = [_new_id() for _ in range(n_sessions)]
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    inbound: dict[int, str] = {}  # coordinator -> the tree edge into it
    edge_rows: list[tuple] = []
    root_edges: list[str] = []
    for c in range(coordinators):
        p = parent[c]
        if p is None:
            continue
        edge_id = _new_id()
        inbound[c] = edge_id
        edge_rows.append((edge_id, zone_id, ids[p], ids[c], app, app, inbound.get(p), resource_id, ["read"],
                          Jsonb({"max_hops": max(1, MAX_LEVEL + 1 - level[p]), "ttl_seconds": 86400}), expires))
        if level[p] == 0:
            root_edges.append(edge_id)
    for c, w in worker_pairs:
        edge_rows.append((_new_id(), zone_id, ids[c], ids[w], app, app, inbound.get(c), resource_id, ["read"],
                          Jsonb({"max_hops": max(1, MAX_LEVEL + 1 - level[c]), "ttl_seconds": 86400}), expires))

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.transaction():
            async with conn.cursor() as cur:
                async with cur.copy("COPY sessions (id, zone_id, application_id, root_id, subject_authority_record_id, "
                                    "ttl_seconds, depth) FROM STDIN") as copy:
                    for sid in ids:
                        await copy.write_row((sid, zone_id, app, sid, record_id, 86400, 0))
                async with cur.copy("COPY delegation_edges (id, zone_id, source_session_id, target_session_id, "
                                    "issuer_application_id, receiver_application_id, parent_edge_id, resource_id, "
                                    "scopes, constraints_json, expires_at) FROM STDIN") as copy:
                    copy.set_types(["text", "text", "text", "text", "text", "text", "text", "text", "text[]",
                                    "jsonb", "timestamptz"])
                    for row in edge_rows:
                        await copy.write_row(row)
                await cur.execute("""INSERT INTO delegation_graph_epochs (zone_id, epoch) VALUES (%s, 1)
                                     ON CONFLICT (zone_id) DO UPDATE SET epoch = delegation_graph_epochs.epoch + 1,
                                     updated_at = now()""", (zone_id,))
        await conn.set_autocommit(True)
        await conn.execute("ANALYZE sessions")
        await conn.execute("ANALYZE delegation_edges")
    max_depth = max([level[c] + 1 for c, _ in worker_pairs] + [max(level)])
    return Graph(sessions=n_sessions, edges=len(edge_rows), roots=level.count(0), coordinators=coordinators,
                 tree_edges=coordinators - level.count(0), worker_edges=len(worker_pairs), max_depth=max_depth,
                 root_edges=root_edges)
