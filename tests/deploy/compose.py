"""docker-compose.yml, read as data for the deploy tests."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import yaml

from tests.deploy.procs import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
IMAGE_REPO = "vkmmu"


@cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def is_vkmmu(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE_REPO


def vkmmu_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if is_vkmmu(s)}


def replicas() -> dict[str, dict[str, Any]]:
    """The vkmmu services that serve (the image's default command); `migrate` is not one."""
    return {name: s for name, s in vkmmu_services().items() if "command" not in s}


# What `docker compose` would take from the environment or `.env` for `${NAME…}` (the tokens).
INTERPOLATED = {
    "VKMMU_ADMIN_TOKEN": "compose-admin-token",
    "VKMMU_METRICS_TOKEN": "compose-metrics-token",
}
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[?-][^}]*)?\}")


def interpolate(value: str) -> str:
    """`${NAME}`, `${NAME:?message}`, `${NAME:-default}` as compose resolves them here."""
    return _VAR.sub(lambda m: INTERPOLATED[m.group(1)], value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}
