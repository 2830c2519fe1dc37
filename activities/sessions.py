"""Session activities: each runs one Postgres transaction (or the fan-out of a cascade).

Activities are at-least-once. A transition that committed but whose completion was lost is not
applied twice: its result is kept in `operation_results` under the workflow's op id, in the same
transaction, and returned again on retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from rules.errors import CoordinatorError
from rules.timefmt import iso_ms
from settings import Settings
from storage import sessions as store
from activities.common import run_once
from storage.db import Conn, Database, q1
from storage.idempotency import SESSION_START, IdempotencyRequest
from workflows import models as m

log = logging.getLogger(__name__)


def own_state(row: dict[str, Any]) -> dict[str, Any]:
    """The fields a session workflow keeps about its own session."""
    expires = store.task_expires_at(row)
    return {
        "application_id": row["application_id"], "lifecycle": row["lifecycle"], "status": row["status"],
        "parent_id": row["parent_id"], "root_id": row["root_id"], "state_version": int(row["state_version"]),
        "expires_at": iso_ms(expires), "heartbeat_deadline_at": iso_ms(row["heartbeat_deadline_at"]),
    }


def to_changes(changes: list[store.SessionChange], exclude: str | None) -> list[m.SessionChange]:
    return [m.SessionChange(c.session_id, c.status, c.state_version, c.reason, c.heartbeat_deadline_at)
            for c in changes if c.session_id != exclude]


def _outcome_from_json(data: dict[str, Any]) -> m.Outcome:
    data = dict(data)
    data["changes"] = [m.SessionChange(**c) for c in data.get("changes", [])]
    data["zone_changes"] = {z: [m.SessionChange(**c) for c in cs] for z, cs in data.get("zone_changes", {}).items()}
    return m.Outcome(**data)


class SessionActivities:
    def __init__(self, db: Database, settings: Settings, client: Client | None) -> None:
        self.db = db
        self.settings = settings
        self.client = client

    async def _rejected(self, exc: CoordinatorError, zone_id: str, session_id: str) -> m.Outcome:
        """A refused command: nothing written; report the session's current state for the workflow."""
        if exc.status >= 500:
            raise exc  # an outage: let the activity retry
        row = await self.db.fetchrow(f"SELECT {store.SESSION_COLUMNS} FROM sessions s WHERE s.zone_id = %s AND s.id = %s",
                                     (zone_id, session_id))
        return m.Outcome(status=exc.status, error=exc.to_details(), session=own_state(row) if row else None)

    @activity.defn(name=m.START_SESSION)
    async def start_session(self, cmd: m.StartSessionCommand) -> m.Outcome:
        idem = None
        if cmd.idempotency_key:
            idem = IdempotencyRequest(SESSION_START, cmd.zone_id, cmd.application_id, cmd.idempotency_key,
                                      bytes.fromhex(cmd.idempotency_digest_hex or ""), cmd.idempotency_generated)
        try:
            async with self.db.transaction() as conn:
                result = await store.start_session(conn, self.settings, cmd, idem)
                row = None if result.replayed else await store.get_session(conn, cmd.zone_id, cmd.session_id)
        except CoordinatorError as exc:
            if exc.status >= 500:
                raise
            return m.Outcome(status=exc.status, error=exc.to_details())
        return m.Outcome(status=result.status, body=result.body, replayed=result.replayed,
                         session=own_state(row) if row else None)

    async def _transition(self, cmd: m.SessionCommand,
                          apply: Callable[[Conn, dict[str, Any]], Awaitable[tuple[dict[str, Any], list[store.SessionChange]]]]
                          ) -> m.Outcome:
        try:
            async with self.db.transaction() as conn:
                async def body() -> m.Outcome:
                    row = await store.get_session(conn, cmd.zone_id, cmd.session_id, lock=True)
                    if row is None:
                        raise CoordinatorError(404, "session_not_found")
                    answer, changes = await apply(conn, row)
                    own = await store.get_session(conn, cmd.zone_id, cmd.session_id)
                    return m.Outcome(status=200, body=answer, session=own_state(own),
                                     changes=to_changes(changes, exclude=cmd.session_id))
                return await run_once(conn, cmd.op_id, body, _outcome_from_json)
        except CoordinatorError as exc:
            return await self._rejected(exc, cmd.zone_id, cmd.session_id)

    @activity.defn(name=m.SUSPEND_SESSION)
    async def suspend_session(self, cmd: m.SessionCommand) -> m.Outcome:
        async def apply(conn: Conn, row: dict[str, Any]):
            changes = await store.suspend_subtree(conn, cmd.zone_id, [cmd.session_id], cmd.reason or "requested")
            if not changes:
                raise CoordinatorError(409, "session_not_found_or_not_active")
            return {"suspended": len(changes)}, changes
        return await self._transition(cmd, apply)

    @activity.defn(name=m.RESUME_SESSION)
    async def resume_session(self, cmd: m.SessionCommand) -> m.Outcome:
        async def apply(conn: Conn, row: dict[str, Any]):
            changes = await store.resume_subtree(conn, self.settings, cmd.zone_id, cmd.session_id)
            if not changes:
                raise CoordinatorError(409, "session_not_found_or_not_suspended")
            return {"resumed": len(changes)}, changes
        return await self._transition(cmd, apply)

    @activity.defn(name=m.TERMINATE_SESSION)
    async def terminate_session(self, cmd: m.SessionCommand) -> m.Outcome:
        async def apply(conn: Conn, row: dict[str, Any]):
            if row["lifecycle"] == "service" and row["status"] in store.LIVE_STATUSES:
                if cmd.lease_generation is None and cmd.lease_required:
                    raise CoordinatorError(400, "lease_generation_required")
                if cmd.lease_generation is not None and cmd.lease_generation != row["lease_generation"]:
                    raise CoordinatorError(409, "session_lease_fenced")
            changes = await store.terminate_subtree(conn, cmd.zone_id, [cmd.session_id], cmd.reason or "requested")
            if not changes:
                raise CoordinatorError(404, "session_not_found")
            return {"terminated": len(changes)}, changes
        return await self._transition(cmd, apply)

    @activity.defn(name=m.TAKE_SESSION_LEASE)
    async def take_session_lease(self, cmd: m.SessionCommand) -> m.Outcome:
        async def apply(conn: Conn, row: dict[str, Any]):
            if row["status"] not in store.LIVE_STATUSES:
                raise CoordinatorError(409, "session_not_live")
            if row["lifecycle"] != "service":
                raise CoordinatorError(409, "session_not_service")
            taken = await q1(conn, """
                UPDATE sessions SET lease_generation = lease_generation + 1, last_heartbeat_at = now(),
                    last_active_at = now(), heartbeat_deadline_at = now() + make_interval(secs => %s), updated_at = now()
                WHERE id = %s RETURNING status, heartbeat_deadline_at, lease_generation""",
                                (self.settings.SERVICE_AGENT_LEASE_SECONDS, cmd.session_id))
            return {"agent_session_id": cmd.session_id, "status": taken["status"],
                    "heartbeat_deadline_at": iso_ms(taken["heartbeat_deadline_at"]),
                    "lease_generation": taken["lease_generation"]}, []
        return await self._transition(cmd, apply)

    @activity.defn(name=m.SETTLE_SESSION_DEADLINE)
    async def settle_session_deadline(self, cmd: m.SessionCommand) -> m.Outcome:
        """A timer fired: expire the task or suspend the lapsed service, or report the moved deadline."""
        async with self.db.transaction() as conn:
            async def body() -> m.Outcome:
                row = await store.get_session(conn, cmd.zone_id, cmd.session_id, lock=True)
                if row is None:
                    return m.Outcome(session={"status": "terminated", "state_version": 1 << 62})
                changes: list[store.SessionChange] = []
                due = await q1(conn, """
                    SELECT (s.lifecycle = 'task' AND s.status IN ('active', 'suspended')
                            AND s.started_at + make_interval(secs => COALESCE(s.ttl_seconds, 3600)) <= now()) AS ttl_due,
                           (s.lifecycle = 'service' AND s.status = 'active' AND s.heartbeat_deadline_at <= now()) AS lease_due
                    FROM sessions s WHERE s.id = %s""", (cmd.session_id,))
                if due["ttl_due"]:
                    changes = await store.terminate_subtree(conn, cmd.zone_id, [cmd.session_id], "ttl", "expired")
                elif due["lease_due"]:
                    changes = await store.suspend_subtree(conn, cmd.zone_id, [cmd.session_id], "service_heartbeat_lost")
                own = await store.get_session(conn, cmd.zone_id, cmd.session_id)
                return m.Outcome(session=own_state(own), changes=to_changes(changes, exclude=cmd.session_id))
            return await run_once(conn, cmd.op_id, body, _outcome_from_json)

    @activity.defn(name=m.NOTIFY_SESSIONS)
    async def notify_sessions(self, cmd: m.NotifyCommand) -> None:
        """Signal each changed session's workflow, in bounded concurrent batches."""
        assert self.client is not None
        size = self.settings.FANOUT_BATCH_SIZE
        for start in range(0, len(cmd.changes), size):
            batch = cmd.changes[start:start + size]
            await asyncio.gather(*(self._signal(cmd.zone_id, c) for c in batch))
            activity.heartbeat(start + len(batch))

    async def _signal(self, zone_id: str, change: m.SessionChange) -> None:
        handle = self.client.get_workflow_handle(m.session_workflow_id(zone_id, change.session_id))
        try:
            await handle.signal("apply_change", change)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # a closed workflow needs no news
                raise
