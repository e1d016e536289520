"""Settings shared by the whole suite (fixtures live beside the tests that use them)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts a real server process on loopback")
