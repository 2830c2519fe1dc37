"""The OpenAPI document: what it documents, and schemathesis against a running stack.

`test_schemathesis_all_checks` serves the app on a real uvicorn server wired to the test session's
Postgres and Temporal (worker and dispatcher running), then runs the pinned schemathesis CLI
against `/openapi.json` with every check, on every operation, with bodies generated from the
documented schemas. Its configuration (`_config`) says what is deliberate:

* auth: zone routes get a mandate of the test zone (app-1, sid ar-1, `coordinator.admin`, so the
  admin reads and writes are reached); the operator routes (directory, /metrics, /stats) get the
  operator token. `ignored_auth` still sends requests without them;
* `zone_id` is pinned to the seeded zone: with random zones every request would stop at 403
  zone_mismatch;
* `wait` of the events long poll is pinned to 0 (it waits that long by design);
* generated strings hold no U+0000 (`allow-x00 = false`): the API refuses NUL in every string
  by design (API description; tests/test_hostile_input.py covers it) and a JSON schema cannot say
  "no NUL anywhere in this free-form metadata";
* generated path values holding a percent-escape are dropped (schemathesis_hooks.py): they are
  sent unescaped and decode to another, valid id, so a "negative" case is a valid request;
* `positive_data_acceptance` also accepts 400, because the reference answers 400 for rules a JSON
  schema cannot state (cursor must exist, expiry from one of three fields, no self-delegation,
  lease generation for a service DELETE); the custom check in tests/contract/schemathesis_hooks.py
  keeps the strict half: schema-valid data is never refused as invalid_body/invalid_query/
  invalid_params or malformed JSON.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from tests.conftest import OPERATOR_TOKEN, Zone
from tests.contract.server import serve

ROOT = Path(__file__).resolve().parent.parent
ST = Path(sys.executable).with_name("st")
# Bounded so the run stays around a minute or two on two cores.
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", "15"))
MAX_SECONDS = 600


def _spec(zone: Zone) -> dict[str, Any]:
    return create_app(services=zone.stack.services).openapi()


def test_every_write_documents_its_request_body(zone: Zone):
    spec = _spec(zone)
    missing = [f"{method.upper()} {path}" for path, item in spec["paths"].items() for method, op in item.items()
               if method in ("post", "put", "patch") and "requestBody" not in op]
    assert missing == []
    # A typed model, not a free-form object, for the writes that take fields.
    op = spec["paths"]["/zones/{zone_id}/agents"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["required"] == ["application_id"] and "ttl_seconds" in body["properties"]
    assert body["properties"]["ttl_seconds"] == {**body["properties"]["ttl_seconds"], "type": "integer"}


def test_every_list_documents_its_query(zone: Zone):
    spec = _spec(zone)
    lists = {"/zones/{zone_id}/agents": {"limit", "cursor", "status", "lifecycle", "application_id", "label"},
             "/zones/{zone_id}/agents/{session_id}/children": {"limit", "cursor"},
             "/zones/{zone_id}/agent-services": {"limit", "cursor"},
             "/zones/{zone_id}/invocations": {"limit", "cursor", "status", "service_id", "session_id"},
             "/zones/{zone_id}/delegations/active": {"limit", "cursor"},
             "/zones/{zone_id}/delegations/inbound/{session_id}": {"limit", "cursor"},
             "/zones/{zone_id}/delegations/outbound/{session_id}": {"limit", "cursor"},
             "/zones/{zone_id}/events": {"after", "topic", "limit", "wait"}}
    for path, names in lists.items():
        documented = {p["name"] for p in spec["paths"][path]["get"].get("parameters", []) if p["in"] == "query"}
        assert names <= documented, (path, documented)
    limit = next(p for p in spec["paths"]["/zones/{zone_id}/agents"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["minimum"] == 1 and limit["schema"]["maximum"] == 500


def test_error_answers_are_documented_and_422_is_not(zone: Zone):
    spec = _spec(zone)
    assert "ErrorBody" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
            if path.startswith("/zones/"):
                assert {"400", "401", "403", "404", "409", "413", "415", "429", "503"} <= set(op["responses"]), path
                assert op.get("security") == [{"bearer": []}], path
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def _config(url: str, zone: Zone) -> str:
    mandate = zone.token(scopes=["coordinator.admin"], ttl_seconds=3600)
    operator_paths = r"^/zones/\{zone_id\}/(applications|resources|authority-records)/|^/(metrics|stats)$"
    return f"""
base-url = "{url}"
workers = 1
request-timeout = 30
continue-on-failure = true

[headers]
Authorization = "Bearer {mandate}"

[parameters]
"path.zone_id" = "{zone.id}"
# The events long poll waits up to `wait` seconds by design: pinned so the run stays bounded.
"query.wait" = 0

[generation]
max-examples = {MAX_EXAMPLES}
allow-x00 = false
deterministic = true

[checks]
positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-path-regex = '{operator_paths}'
headers = {{ Authorization = "Bearer {OPERATOR_TOKEN}" }}
"""


@pytest.mark.timeout(900)
async def test_schemathesis_all_checks(zone: Zone, tmp_path: Path):
    if not ST.exists():
        pytest.skip(f"schemathesis is not installed ({ST}); pip install -e '.[dev]'")
    app = create_app(services=zone.stack.services)
    async with serve(app) as url:
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(url, zone))
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.contract.schemathesis_hooks",
               "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "160"}
        proc = await asyncio.create_subprocess_exec(
            str(ST), "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
            "--report", "junit", "--report-dir", str(tmp_path / "reports"),
            cwd=str(tmp_path), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), MAX_SECONDS)
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert proc.returncode == 0, text[-20000:]
    selected = re.search(r"(\d+) selected / (\d+) total", text)
    assert selected and selected.group(1) == selected.group(2), text[-5000:]  # every operation
    cases = re.search(r"(\d+) generated, (\d+) passed", text)  # absent when a case failed
    assert cases and cases.group(1) == cases.group(2), text[-5000:]
