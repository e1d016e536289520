"""docker-compose.yml without a Docker engine: valid under the Compose Specification's own
JSON schema (shipped in tests/deploy/compose_spec), and consistent with the app, the image,
the proxy, Prometheus and Grafana provisioning."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from app.config import Settings
from tests.deploy.compose import (
    COMPOSE_FILE,
    compose,
    environment,
    replicas,
    services,
    vkmmu_services,
)
from tests.deploy.procs import NGINX_CONF, REPO

SCHEMA = Path(__file__).with_name("compose_spec") / "compose-spec.json"
APP_PORT = 8000


def settings_env_names() -> set[str]:
    """Every variable the app reads: VKMMU_ + a Settings field."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def test_schema_is_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


def test_compose_file_is_valid_under_the_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose())


def test_the_schema_check_catches_mistakes() -> None:
    """The validation is real: a misspelt key or a bad depends_on condition is refused."""
    schema = json.loads(SCHEMA.read_text())
    bad = yaml.safe_load(COMPOSE_FILE.read_text())
    bad["services"]["migrate"]["restart_policy"] = "no"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)
    bad = yaml.safe_load(COMPOSE_FILE.read_text())
    bad["services"]["vkmmu-1"]["depends_on"]["migrate"]["condition"] = "service_done"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)


def test_vkmmu_services_use_this_image_and_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in vkmmu_services().items():
        assert svc["image"] == f"vkmmu:{version}", name
        assert svc["build"] == ".", name
    assert set(replicas()) == {"vkmmu-1", "vkmmu-2"}
    assert services()["migrate"]["command"] == ["migrate"]


def test_environment_is_only_what_the_app_reads() -> None:
    known = settings_env_names()
    for name, svc in services().items():
        env = environment(svc)
        if name in vkmmu_services():
            assert set(env) <= known, f"{name}: the app does not read {set(env) - known}"
            # Values the app accepts: Settings validates them as it will at start.
            fields = {k.removeprefix("VKMMU_").lower(): v for k, v in env.items()}
            try:
                Settings(**fields)
            except ValidationError as e:  # pragma: no cover - the message is the point
                pytest.fail(f"{name}: {e}")
        else:
            assert not [k for k in env if k.startswith("VKMMU_")], name


def test_database_url_names_the_postgres_service() -> None:
    pg = services()["postgres"]
    pg_env = environment(pg)
    for name, svc in vkmmu_services().items():
        url = make_url(environment(svc)["VKMMU_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg", name
        assert (url.host, url.port) == ("postgres", 5432), name
        assert url.username == pg_env["POSTGRES_USER"], name
        assert url.password == pg_env["POSTGRES_PASSWORD"], name
        assert url.database == pg_env["POSTGRES_DB"], name
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])


def test_start_order() -> None:
    """postgres healthy -> migrate completes -> replicas healthy -> proxy."""
    svcs = services()
    assert svcs["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svcs["migrate"]["restart"] == "no"
    for name, svc in replicas().items():
        deps = svc["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert svcs["proxy"]["depends_on"][name]["condition"] == "service_healthy"


def _ports(svc: dict[str, Any]) -> list[str]:
    return [str(p) for p in svc.get("ports", [])]


def test_ports_match_the_app_the_proxy_and_prometheus() -> None:
    default_port = Settings.model_fields["port"].default
    assert default_port == APP_PORT
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"(?m)^EXPOSE {APP_PORT}$", dockerfile)
    for name, svc in replicas().items():
        assert svc["expose"] == [str(APP_PORT)], name
        assert "ports" not in svc, f"{name}: replicas are reached through the proxy"
        assert environment(svc).get("VKMMU_PORT", str(APP_PORT)) == str(APP_PORT)

    nginx = NGINX_CONF.read_text()
    upstreams = re.findall(r"(?m)^\s*server (\S+:\d+)", nginx)
    assert upstreams == [f"{name}:{APP_PORT}" for name in replicas()]
    listen = re.search(r"(?m)^\s*listen (\d+);", nginx)
    assert listen is not None
    assert _ports(services()["proxy"]) == [f"{listen.group(1)}:{listen.group(1)}"]

    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"{name}:{APP_PORT}" for name in replicas()]


def test_tokens_come_from_outside_the_file_and_prometheus_sends_one() -> None:
    """The replicas get both tokens by interpolation (compose refuses to start without
    them); Prometheus scrapes with the metrics token from the file compose mounts."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name in replicas():
        env = raw["services"][name]["environment"]
        for var in ("VKMMU_ADMIN_TOKEN", "VKMMU_METRICS_TOKEN"):
            assert env[var].startswith("${" + var + ":?"), (name, var)
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    auth = job["authorization"]
    assert auth["type"] == "Bearer"
    mounts = [str(v) for v in services()["prometheus"]["volumes"]]
    folder = auth["credentials_file"].rsplit("/", 1)[0]
    assert any(v.endswith(f":{folder}:ro") for v in mounts), mounts
    assert _ports(services()["prometheus"]) == ["9090:9090"]


def _binds(svc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in svc.get("volumes", []):
        source, target = str(v).split(":")[:2]
        if source.startswith("."):
            out.append((source, target))
    return out


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for v in svc.get("volumes", []):
            source = str(v).split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_grafana_provisioning_points_at_the_mounted_dashboard_folder() -> None:
    grafana = services()["grafana"]
    binds = dict(_binds(grafana))
    assert binds["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    folder = binds["./deploy/grafana"]
    prov = REPO / "deploy/grafana/provisioning"
    dashboards = yaml.safe_load((prov / "dashboards/vkmmu.yml").read_text())
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == folder
    sources = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
