"""The local servers of devstack/: a real Postgres and a real Temporal dev server start, answer and stop."""

from __future__ import annotations

import json

import httpx
import psycopg
import pytest

from devstack.postgres import free_port, start_postgres
from devstack.seed import SeedError, seed_demo_zone
from devstack.temporal import SEARCH_ATTRIBUTES, start_temporal


def test_postgres_ephemeral_start_kill_restart_stop(tmp_path):
    pg = start_postgres(tmp_path / "pg", free_port(), ephemeral=True)
    try:
        assert pg.is_running()
        assert pg.url("x") == f"postgresql://postgres@127.0.0.1:{pg.port}/x"
        pg.create_database("coordinator")
        pg.create_database("coordinator")  # no-op when it exists
        with psycopg.connect(pg.url("coordinator")) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            assert conn.execute("SHOW max_connections").fetchone() == ("200",)
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.commit()
        pg.kill()  # a crash: committed rows survive, the next start recovers
        assert not pg.is_running()
        pg.start()
        pg.start()  # idempotent
        with psycopg.connect(pg.url("coordinator")) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        pg.stop()
    assert not pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.url(), connect_timeout=1)


async def test_temporal_dev_server_registers_search_attributes():
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
    from temporalio.client import Client

    server = start_temporal(port=free_port())
    try:
        assert server.is_running() and server.ui_url is None
        client = await Client.connect(server.address)
        resp = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace="default"))
        registered = {name: IndexedValueType.Name(t) for name, t in resp.custom_attributes.items()}
        for name, type_ in SEARCH_ATTRIBUTES.items():
            assert registered.get(name) == f"INDEXED_VALUE_TYPE_{type_.upper()}", name
    finally:
        server.stop()
    assert not server.is_running()


def test_temporal_restarts_on_its_db_file(tmp_path):
    db = tmp_path / "temporal.db"
    server = start_temporal(port=free_port(), db_file=db, log_file=tmp_path / "temporal.log",
                            dynamic_config={"limit.historyCount.suggestContinueAsNew": 200})
    try:
        assert "limit.historyCount.suggestContinueAsNew=200" in server.command()
        server.stop()
        assert db.exists()
        server.start()  # the search attributes already exist in the file: start must still work
        assert server.is_running()
    finally:
        server.stop()


async def test_seed_demo_zone_puts_the_directory():
    calls: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "PUT"
        assert request.headers["Authorization"] == "Bearer op-token"
        body = json.loads(request.content)
        calls.append((request.url.path, body))
        return httpx.Response(200, json=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://api") as client:
        result = await seed_demo_zone("http://api", "op-token", client=client)
    paths = [path for path, _ in calls]
    assert paths == [
        "/zones/demo/applications/demo-app", "/zones/demo/applications/peer-app",
        "/zones/demo/applications/dcr-app", "/zones/demo/resources/res-docs",
        "/zones/demo/resources/res-calendar", "/zones/demo/authority-records/ar-demo",
        "/zones/demo/authority-records/ar-peer",
    ]
    assert result["applications"]["dcr-app"]["registration_method"] == "dcr"
    assert result["applications"]["dcr-app"]["expires_at"].endswith("Z")
    assert result["resources"]["res-docs"] == {"identifier": "resource://docs", "scopes": ["docs:read", "docs:write"]}
    assert result["authority_records"]["ar-peer"]["subject_id"] == "peer-app"

    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(401, json={})),
                                 base_url="http://api") as client:
        with pytest.raises(SeedError, match="applications/demo-app answered 401"):
            await seed_demo_zone("http://api", "op-token", client=client)
