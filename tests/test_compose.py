"""docker-compose.yml: valid against the compose-spec JSON schema (the copy vendored by
check-jsonschema; no container engine runs here) and shaped as the README describes."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from rules.workflow_contract import SEARCH_ATTRIBUTES, SERVER_DYNAMIC_CONFIG

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_compose_file_validates_against_the_compose_spec():
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    jsonschema.validate(compose(), schema)


def test_a_schema_violation_is_caught():
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    broken = compose()
    broken["services"]["api"]["healthcheck"]["interval"] = {"seconds": 5}
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert errors


def test_supported_temporal_images_pinned_and_every_part_present():
    services = compose()["services"]
    images = {name: svc.get("image", "") for name, svc in services.items()}
    for name, image in images.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
    assert not any("auto-setup" in image for image in images.values())  # deprecated with server 1.30
    assert images["temporal"].startswith("temporalio/server:")
    assert images["temporal-schema"].startswith("temporalio/admin-tools:")
    assert images["temporal-setup"].startswith("temporalio/admin-tools:")
    assert images["temporal-ui"].startswith("temporalio/ui:")
    # The server starts after its schema job; the namespace and search attributes after the server.
    assert services["temporal"]["depends_on"]["temporal-schema"]["condition"] == "service_completed_successfully"
    setup = "\n".join(services["temporal-setup"]["command"])
    assert "namespace create" in setup and "--retention" in setup
    for name in SEARCH_ATTRIBUTES:
        assert name in setup, name
    # Coordinator processes: migrate once, then the API, workers and dispatchers with healthchecks,
    # the latter two as replicas.
    for name in ("api", "worker", "dispatcher"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in services[name], name
    for name in ("worker", "dispatcher"):
        assert "replicas" in services[name]["deploy"], name
    assert services["dispatcher"]["environment"]["DISPATCH_HEALTH_FILE"] in "\n".join(
        services["dispatcher"]["healthcheck"]["test"])


def test_the_temporal_server_gets_the_dynamic_config_the_dispatcher_relies_on():
    doc = compose()
    temporal = doc["services"]["temporal"]
    (mount,) = [c for c in temporal["configs"] if c["source"] == "temporal-dynamic-config"]
    assert temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"] == mount["target"]
    content = yaml.safe_load(doc["configs"]["temporal-dynamic-config"]["content"])
    assert {key: values[0]["value"] for key, values in content.items()} == SERVER_DYNAMIC_CONFIG
