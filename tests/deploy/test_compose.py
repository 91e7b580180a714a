"""The compose file: parses, and names only roles, options and settings that exist."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.broker.wake import DELIVERY_QUEUE, TRIAGE_QUEUE
from dicom_node.settings import Settings
from tests.deploy.files import (
    COMPOSE,
    DEPLOY,
    ENV_EXAMPLE,
    INTERPOLATION,
    SETTING_VARIABLES,
    cli_arguments_for,
    env_assignments,
    load_compose,
    parse_cli,
    setting_names_in,
)

OUR_IMAGES = ("spine-triage:cpu", "spine-triage:cuda")
STORAGE = "/var/lib/spine-triage/storage"


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") in OUR_IMAGES
    }


def test_compose_has_the_production_services() -> None:
    services = load_compose()["services"]
    for name in ("postgres", "redis", "migrate", "node", "worker-gpu", "worker-delivery"):
        assert name in services, f"compose.yaml lacks the {name} service"
    assert services["flower"]["image"].startswith("mher/flower")
    assert services["orthanc"]["profiles"] == ["test-pacs"], "Orthanc is optional"
    assert "beat" not in services, "the node runs the scheduler; no Celery beat"


def test_every_container_command_is_a_command_line_that_parses() -> None:
    services = our_services(load_compose())
    assert set(services) >= {"migrate", "node", "worker-gpu", "worker-delivery"}
    handlers = {}
    for name, service in services.items():
        args = parse_cli(cli_arguments_for(service["command"]))
        handlers[name] = args.handler.__name__
    assert handlers["node"] == "run_node"
    assert handlers["worker-gpu"] == handlers["worker-delivery"] == "run_worker"
    assert handlers["migrate"] == "_upgrade"


def test_gpu_workers_take_inference_and_cpu_workers_take_delivery() -> None:
    services = load_compose()["services"]
    gpu = parse_cli(cli_arguments_for(services["worker-gpu"]["command"]))
    cpu = parse_cli(cli_arguments_for(services["worker-delivery"]["command"]))
    assert gpu.queues == TRIAGE_QUEUE
    assert cpu.queues == DELIVERY_QUEUE
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker-gpu"]["image"] == "spine-triage:cuda"
    assert services["worker-gpu"]["build"]["args"]["VARIANT"] == "cuda"
    assert services["worker-delivery"]["image"] == "spine-triage:cpu"
    assert "deploy" not in services["worker-delivery"]


def test_environment_names_only_settings_that_exist() -> None:
    compose = load_compose()
    for name, service in our_services(compose).items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        unknown = {key for key in environment if key.startswith("SPINE_TRIAGE_")}
        unknown -= SETTING_VARIABLES
        assert not unknown, f"{name} sets settings that do not exist: {sorted(unknown)}"
    text = COMPOSE.read_text()
    assert setting_names_in(text) <= SETTING_VARIABLES, setting_names_in(text) - SETTING_VARIABLES
    interpolated = {match.group(1) for match in INTERPOLATION.finditer(text)}
    assert {v for v in interpolated if v.startswith("SPINE_TRIAGE_")} <= SETTING_VARIABLES


def test_the_environment_validates_against_the_settings_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wiring plus each of env.example's values, read from the environment as a
    container would, make settings the model accepts."""
    compose = load_compose()
    examples = env_assignments(ENV_EXAMPLE.read_text())
    compose_values = dict(examples)
    for name, service in our_services(compose).items():
        wiring = {
            key: INTERPOLATION.sub(lambda m: compose_values[m.group(1)], str(value))
            for key, value in service["environment"].items()
        }
        for key, value in [(None, None), *examples]:
            if key is not None and not key.startswith("SPINE_TRIAGE_"):
                continue
            extra = {} if key is None else {key: value}
            settings = _settings_from_environment(monkeypatch, {**extra, **wiring})
            if key == "SPINE_TRIAGE_DESTINATIONS":
                assert settings.destinations, f"{name}: {value} gave no destination"
        assert settings.database_url.startswith("postgresql+psycopg2://")
        assert settings.broker_url.startswith("redis://")
        assert str(settings.resolved_storage_dir) == STORAGE
        assert settings.api_token, "writes to the REST API must need a token"


def _settings_from_environment(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> Settings:
    for variable in SETTING_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_env_example_names_only_settings_that_exist() -> None:
    text = ENV_EXAMPLE.read_text()
    assert setting_names_in(text) <= SETTING_VARIABLES, setting_names_in(text) - SETTING_VARIABLES
    required = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if ":?" in m[0]}
    documented = {key for key, _ in env_assignments(text)}
    assert required <= documented, f"env.example lacks {sorted(required - documented)}"


def test_node_and_workers_share_storage_and_use_the_site_env_file() -> None:
    compose = load_compose()
    for name, service in our_services(compose).items():
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts.get(STORAGE) == "storage", f"{name} must mount the shared storage"
        assert service["env_file"] == [{"path": ".env", "required": False}]
    assert "storage" in compose["volumes"] and "database" in compose["volumes"]


def test_health_checks_and_start_order() -> None:
    services = load_compose()["services"]
    node_check = " ".join(services["node"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/health" in node_check
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("node", "worker-gpu", "worker-delivery"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"


def test_http_port_is_published_on_loopback_only() -> None:
    """The worklist shows patient data: loopback only unless the site sets up HTTPS."""
    services = load_compose()["services"]
    http = [port for port in services["node"]["ports"] if port.endswith(":8080")]
    assert http and all(port.startswith("127.0.0.1:") for port in http)
    assert all(port.startswith("127.0.0.1:") for port in services["flower"]["ports"])


@pytest.mark.parametrize("service", ["orthanc"])
def test_test_pacs_forwards_to_the_node_it_names(service: str) -> None:
    import json

    orthanc = load_compose()["services"][service]
    environment = orthanc["environment"]
    modalities = json.loads(environment["ORTHANC__DICOM_MODALITIES"])
    ae_title, host, port = modalities["spine-triage"]
    examples = dict(env_assignments(ENV_EXAMPLE.read_text()))
    assert ae_title == examples["SPINE_TRIAGE_AE_TITLE"] == Settings().ae_title
    assert (host, port) == ("node", 11112)
    assert environment["ORTHANC__DICOM_AET"] in examples["SPINE_TRIAGE_ALLOWED_CALLING_AES"]
    mounted = [volume.split(":")[0] for volume in orthanc["volumes"] if volume.startswith("./")]
    for source in mounted:
        assert (DEPLOY / source).is_file(), f"{source} is mounted but missing"
    lua_paths = json.loads(environment["ORTHANC__LUA_SCRIPTS"])
    targets = [volume.split(":")[1] for volume in orthanc["volumes"]]
    assert set(lua_paths) <= set(targets)
