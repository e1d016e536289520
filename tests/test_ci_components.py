"""Every real component some test needs, in one list: present (and PostgreSQL answering) or,
under CI, a failure here even if the tests that use it were deselected or never reached the
point of asking. Locally a missing one is a skip (tests/conftest.py: require)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
from sqlalchemy import create_engine, text

from app.db.session import sync_url
from tests.conftest import require

COMMANDS = {  # the command, and where .ci/run gets it
    "chromium": ".ci/deps/chromium.sh",
    "chromedriver": ".ci/deps/chromium.sh",
    "node": ".ci/deps/node.sh",
    "npm": ".ci/deps/node.sh",
    "nginx": ".ci/deps/nginx.sh",
    "promtool": ".ci/deps/promtool.sh",
    "curl": ".ci/deps/curl-jq.sh",
    "jq": ".ci/deps/curl-jq.sh",
}


def test_postgresql_is_configured_and_answers() -> None:
    url = os.environ.get("VKMMU_TEST_PG_URL")
    require(bool(url), "PostgreSQL (VKMMU_TEST_PG_URL)")
    assert url is not None
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    except Exception as e:  # unreachable: never a skip once the URL is set
        pytest.fail(f"VKMMU_TEST_PG_URL is set but PostgreSQL does not answer: {e}")
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_is_installed(command: str) -> None:
    found = shutil.which(command) or (command == "chromium" and shutil.which("chromium-browser"))
    require(bool(found), f"{command} ({COMMANDS[command]})")
    assert found


@pytest.mark.parametrize("module", ["selenium", "schemathesis", "hypothesis"])
def test_python_dev_extra_is_installed(module: str) -> None:
    require(importlib.util.find_spec(module) is not None, f"{module} (the dev extra)")
    assert importlib.util.find_spec(module) is not None
