"""The API's only door to Temporal: start workflows, send updates, and map every failure to a
client-visible answer (a rejected command → its 4xx; Temporal unreachable → 503 temporal_unavailable).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from rules.errors import CoordinatorError
from settings import Settings
from workflows import models as m
from workflows.invocation import SA_INVOCATION_STATUS, InvocationWorkflow
from workflows.session import (
    SA_APPLICATION, SA_LIFECYCLE, SA_PARENT, SA_SESSION, SA_STATUS, SA_ZONE, SessionWorkflow,
)

SA_INVOCATION = SearchAttributeKey.for_keyword("InvocationId")
SA_SERVICE = SearchAttributeKey.for_keyword("ServiceId")


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

    async def _start_with_update(self, run, state: Any, workflow_id: str, update, cmd: Any,
                                 attrs: list[SearchAttributePair], summary: str, details: str) -> dict[str, Any]:
        """Update-with-start: the workflow's first update runs the create transaction."""
        op = WithStartWorkflowOperation(
            run, state, id=workflow_id, task_queue=self.settings.TEMPORAL_TASK_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING, search_attributes=TypedSearchAttributes(attrs),
            static_summary=summary, static_details=details)
        try:
            return await self._client().execute_update_with_start_workflow(
                update, cmd, start_workflow_operation=op, rpc_timeout=self.rpc_timeout)
        except Exception as exc:
            mapped = map_failure(exc)
            if isinstance(mapped, WorkflowClosed):
                raise temporal_unavailable() from exc
            raise mapped from exc

    async def start_session(self, cmd: m.StartSessionCommand) -> dict[str, Any]:
        state = m.SessionState(zone_id=cmd.zone_id, session_id=cmd.session_id, application_id=cmd.application_id,
                               lifecycle=cmd.lifecycle, parent_id=cmd.parent_id)
        attrs = [SearchAttributePair(SA_ZONE, cmd.zone_id), SearchAttributePair(SA_SESSION, cmd.session_id),
                 SearchAttributePair(SA_APPLICATION, cmd.application_id),
                 SearchAttributePair(SA_LIFECYCLE, cmd.lifecycle), SearchAttributePair(SA_STATUS, "creating")]
        if cmd.parent_id:
            attrs.append(SearchAttributePair(SA_PARENT, cmd.parent_id))
        return await self._start_with_update(
            SessionWorkflow.run, state, m.session_workflow_id(cmd.zone_id, cmd.session_id), SessionWorkflow.create,
            cmd, attrs, f"{cmd.lifecycle} session {cmd.session_id}",
            f"zone {cmd.zone_id} · application {cmd.application_id} · parent {cmd.parent_id or '-'}")

    async def start_invocation(self, cmd: m.CreateInvocationCommand) -> dict[str, Any]:
        state = m.InvocationState(zone_id=cmd.zone_id, invocation_id=cmd.invocation_id, service_id=cmd.service_id)
        attrs = [SearchAttributePair(SA_ZONE, cmd.zone_id), SearchAttributePair(SA_INVOCATION, cmd.invocation_id),
                 SearchAttributePair(SA_SERVICE, cmd.service_id), SearchAttributePair(SA_APPLICATION, cmd.scope_id),
                 SearchAttributePair(SA_INVOCATION_STATUS, "creating")]
        if cmd.source_session_id:
            attrs.append(SearchAttributePair(SA_SESSION, cmd.source_session_id))
        return await self._start_with_update(
            InvocationWorkflow.run, state, m.invocation_workflow_id(cmd.zone_id, cmd.invocation_id),
            InvocationWorkflow.create, cmd, attrs, f"invocation {cmd.method} {cmd.invocation_id}",
            f"zone {cmd.zone_id} · application {cmd.scope_id} · service {cmd.service_id} · "
            f"source {cmd.source_session_id or '-'}")

    async def update(self, workflow_id: str, update: str, cmd: Any) -> dict[str, Any]:
        handle = self._client().get_workflow_handle(workflow_id)
        for attempt in range(4):
            try:
                return await handle.execute_update(update, cmd, result_type=dict, rpc_timeout=self.rpc_timeout)
            except RPCError as exc:
                # The update met a workflow task that failed (e.g. it raced a cascade signal that
                # ends the workflow): it was never accepted, so sending it again is safe.
                if exc.status == RPCStatusCode.FAILED_PRECONDITION and attempt < 3:
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                raise map_failure(exc) from exc
            except Exception as exc:
                raise map_failure(exc) from exc
        raise AssertionError("unreachable")

    async def session_update(self, zone_id: str, session_id: str, update: str, cmd: m.SessionCommand) -> dict[str, Any]:
        return await self.update(m.session_workflow_id(zone_id, session_id), update, cmd)
