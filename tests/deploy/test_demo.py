"""`vkmmu demo` and `vkmmu --version`."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from app import demo
from app.cli import main
from tests.deploy.procs import REPO, vkmmu_command


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"vkmmu {version}"


def test_version_from_the_installed_command() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run([*vkmmu_command(), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"vkmmu {version}"


def test_demo_runs_the_tour_and_shows_the_quirk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no colour codes
    for n, step in enumerate(demo.TOUR, 1):
        assert f"{n}. {step.title}" in out
    # The verdict table: the same delete with the quirk on and off.
    on = re.search(r"│ on\s+│ zap_all_fast\s+│\s+2048 │\s+1 │\s+1024 │", out)
    off = re.search(r"│ off\s+│ zap_slot_leafs\s+│\s+1024 │\s+0 │\s+0 │", out)
    assert on and off, out[-2000:]
    # The zap events, newest first.
    assert re.search(r"2\s+memslot_delete\s+zap_slot_leafs\s+1\s+False\s+1024", out)
    assert re.search(r"1\s+memslot_delete\s+zap_all_fast\s+1\s+True\s+2048", out)


def _tour_calls() -> list[tuple[str, str]]:
    """(METHOD, path) of every call in docs/tour.sh, `$VM` as `{vm}`."""
    calls = []
    for line in (REPO / "docs" / "tour.sh").read_text().splitlines():
        line = line.strip()
        if line.startswith("#") or line.startswith(("post()", "put()")):
            continue
        for m in re.finditer(r"\b(post|put) (/\S+)|curl -s(?: -X(\w+))? \"\$API(/[^\"]+)\"", line):
            if m.group(1):
                calls.append((m.group(1).upper(), m.group(2)))
            elif m.group(4):
                calls.append((m.group(3) or "GET", m.group(4)))
    return [(method, "/v1" + path.replace("$VM", "{vm}")) for method, path in calls]


def test_demo_makes_the_calls_of_the_readme_tour() -> None:
    assert _tour_calls() == [(s.method, s.path) for s in demo.TOUR]
