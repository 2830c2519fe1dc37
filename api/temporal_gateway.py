"""The API's only door to Temporal: start workflows, send updates, and map every failure to a
client-visible answer (a rejected command → its 4xx; Temporal unreachable → 503 temporal_unavailable).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import TypedSearchAttributes, SearchAttributePair, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from rules.errors import CoordinatorError
from settings import Settings
from workflows import models as m
from workflows.session import (
    SA_APPLICATION, SA_LIFECYCLE, SA_PARENT, SA_SESSION, SA_STATUS, SA_ZONE, SessionWorkflow,
)


def temporal_unavailable() -> CoordinatorError:
    return CoordinatorError(503, "temporal_unavailable", dependency="temporal")


class WorkflowClosed(Exception):
    """The entity's workflow has already completed; the caller answers from Postgres."""


def map_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, WorkflowUpdateFailedError):
        cause = exc.cause
        while cause is not None and not (isinstance(cause, ApplicationError) and cause.type == "CoordinatorError"):
            cause = getattr(cause, "cause", None)
        if cause is not None and len(cause.details) >= 2:
            return CoordinatorError.from_details(list(cause.details[:2]))
        return CoordinatorError(500, "internal_error", error_description=str(exc))
    if isinstance(exc, WorkflowUpdateRPCTimeoutOrCancelledError):
        return temporal_unavailable()
    if isinstance(exc, RPCError):
        if exc.status == RPCStatusCode.NOT_FOUND:
            return WorkflowClosed(str(exc))
        if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:
            return CoordinatorError(429, "rate_limited", retry_after=1)
        return temporal_unavailable()
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return temporal_unavailable()
    return exc


class TemporalGateway:
    def __init__(self, client: Client | None, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.rpc_timeout = timedelta(seconds=settings.TEMPORAL_RPC_TIMEOUT_SECONDS)

    def _client(self) -> Client:
        if self.client is None:
            raise temporal_unavailable()
        return self.client

    async def start_session(self, cmd: m.StartSessionCommand) -> dict[str, Any]:
        client = self._client()
        state = m.SessionState(zone_id=cmd.zone_id, session_id=cmd.session_id, application_id=cmd.application_id,
                               lifecycle=cmd.lifecycle, parent_id=cmd.parent_id)
        attrs = [SearchAttributePair(SA_ZONE, cmd.zone_id), SearchAttributePair(SA_SESSION, cmd.session_id),
                 SearchAttributePair(SA_APPLICATION, cmd.application_id),
                 SearchAttributePair(SA_LIFECYCLE, cmd.lifecycle), SearchAttributePair(SA_STATUS, "creating")]
        if cmd.parent_id:
            attrs.append(SearchAttributePair(SA_PARENT, cmd.parent_id))
        op = WithStartWorkflowOperation(
            SessionWorkflow.run, state, id=m.session_workflow_id(cmd.zone_id, cmd.session_id),
            task_queue=self.settings.TEMPORAL_TASK_QUEUE, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(attrs),
            static_summary=f"{cmd.lifecycle} session {cmd.session_id}",
            static_details=(f"zone {cmd.zone_id} · application {cmd.application_id} · "
                            f"parent {cmd.parent_id or '-'}"))
        try:
            return await client.execute_update_with_start_workflow(
                SessionWorkflow.create, cmd, start_workflow_operation=op, rpc_timeout=self.rpc_timeout)
        except Exception as exc:
            mapped = map_failure(exc)
            if isinstance(mapped, WorkflowClosed):
                raise temporal_unavailable() from exc
            raise mapped from exc

    async def session_update(self, zone_id: str, session_id: str, update: str, cmd: m.SessionCommand) -> dict[str, Any]:
        handle = self._client().get_workflow_handle(m.session_workflow_id(zone_id, session_id))
        try:
            return await handle.execute_update(update, cmd, result_type=dict, rpc_timeout=self.rpc_timeout)
        except Exception as exc:
            raise map_failure(exc) from exc
