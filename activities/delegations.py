"""Delegation activities: run by the source session's workflow (`delegate` and `revoke` updates)."""

from __future__ import annotations

from temporalio import activity

from activities.common import run_once
from activities.sessions import _outcome_from_json, own_state, to_changes
from rules.errors import CoordinatorError
from settings import Settings
from storage import delegations as store
from storage import sessions as session_store
from storage.db import Database
from storage.idempotency import DELEGATION_CREATE, IdempotencyRequest
from workflows import models as m


class DelegationActivities:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    @activity.defn(name=m.CREATE_DELEGATION)
    async def create_delegation(self, cmd: m.DelegateCommand) -> m.Outcome:
        idem = None
        if cmd.idempotency_key:
            idem = IdempotencyRequest(DELEGATION_CREATE, cmd.zone_id, cmd.issuer_application_id, cmd.idempotency_key,
                                      bytes.fromhex(cmd.idempotency_digest_hex or ""))
        try:
            async with self.db.transaction() as conn:
                result = await store.create_edge(conn, self.settings, cmd, idem)
        except CoordinatorError as exc:
            if exc.status >= 500:
                raise
            return m.Outcome(status=exc.status, error=exc.to_details())
        return m.Outcome(status=result["status"], body=result["body"], replayed=result["replayed"])

    @activity.defn(name=m.REVOKE_DELEGATION)
    async def revoke_delegation(self, cmd: m.RevokeCommand) -> m.Outcome:
        try:
            async with self.db.transaction() as conn:
                async def apply() -> m.Outcome:
                    result = await store.revoke_cascade(conn, cmd.zone_id, cmd.edge_id, cmd.expected_epoch)
                    own = await session_store.get_session(conn, cmd.zone_id, cmd.session_id)
                    return m.Outcome(body=result.body, session=own_state(own) if own else None,
                                     changes=to_changes(result.changes, exclude=cmd.session_id))
                return await run_once(conn, cmd.op_id, apply, _outcome_from_json)
        except CoordinatorError as exc:
            if exc.status >= 500:
                raise
            return m.Outcome(status=exc.status, error=exc.to_details())
