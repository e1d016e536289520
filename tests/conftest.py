"""Settings shared by the whole suite (fixtures live beside the tests that use them)."""

from __future__ import annotations

import os

import pytest

# Under CI a missing real component (PostgreSQL, Chromium, Node, a proxy binary) is a failure,
# not a skip: a green run must mean every test ran.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
    """Skip the calling test when `what` is missing locally; fail it under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts a real server process on loopback")
