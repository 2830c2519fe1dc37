"""Invocation activities: one Postgres transaction each (create, start/cancel/complete, deadline)."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from activities.common import run_once
from rules.errors import CoordinatorError
from settings import Settings
from storage import invocations as store
from storage.db import Database
from storage.idempotency import INVOCATION_CREATE, IdempotencyRequest
from workflows import models as m


def _decode(data: dict[str, Any]) -> m.InvocationOutcome:
    return m.InvocationOutcome(**data)


class InvocationActivities:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    @activity.defn(name=m.CREATE_INVOCATION)
    async def create_invocation(self, cmd: m.CreateInvocationCommand) -> m.InvocationOutcome:
        idem = IdempotencyRequest(INVOCATION_CREATE, cmd.zone_id, cmd.scope_id, cmd.idempotency_key,
                                  bytes.fromhex(cmd.idempotency_digest_hex))
        try:
            async with self.db.transaction() as conn:
                result = await store.create(conn, self.settings, cmd, idem)
        except CoordinatorError as exc:
            if exc.status >= 500:
                raise
            return m.InvocationOutcome(status=exc.status, error=exc.to_details())
        row = result["row"]
        return m.InvocationOutcome(status=result["status"], body=result["body"], replayed=result["replayed"],
                                   invocation={**store.workflow_state(row), "service_id": row["service_id"]}
                                   if row else None)

    @activity.defn(name=m.TRANSITION_INVOCATION)
    async def transition_invocation(self, cmd: m.InvocationCommand) -> m.InvocationOutcome:
        try:
            async with self.db.transaction() as conn:
                async def apply() -> m.InvocationOutcome:
                    if cmd.action == "start":
                        row = await store.start(conn, cmd.zone_id, cmd.invocation_id)
                    elif cmd.action == "cancel":
                        row = await store.cancel(conn, cmd.zone_id, cmd.invocation_id, cmd.reason)
                    elif cmd.action == "complete":
                        row = await store.complete(conn, cmd.zone_id, cmd.invocation_id, cmd.status or "failed",
                                                   cmd.error, cmd.metadata)
                    else:
                        raise CoordinatorError(400, "invalid_action")
                    return m.InvocationOutcome(body=store.projection(row), invocation=store.workflow_state(row))
                return await run_once(conn, cmd.op_id, apply, _decode)
        except CoordinatorError as exc:
            if exc.status >= 500:
                raise
            async with self.db.connection() as conn:
                row = await store.get(conn, cmd.zone_id, cmd.invocation_id)
            return m.InvocationOutcome(status=exc.status, error=exc.to_details(),
                                       invocation=store.workflow_state(row) if row else None)

    @activity.defn(name=m.SETTLE_INVOCATION_DEADLINE)
    async def settle_invocation_deadline(self, cmd: m.InvocationCommand) -> m.InvocationOutcome:
        async with self.db.transaction() as conn:
            async def apply() -> m.InvocationOutcome:
                await store.settle_deadline(conn, cmd.zone_id, cmd.invocation_id)
                row = await store.get(conn, cmd.zone_id, cmd.invocation_id)
                return m.InvocationOutcome(invocation=store.workflow_state(row) if row else {"status": "dead",
                                                                                            "state_version": 1 << 62})
            return await run_once(conn, cmd.op_id, apply, _decode)
