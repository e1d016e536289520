"""The API fixtures (a started app on a fresh SQLite database per test), shared."""

from __future__ import annotations

from tests.api.conftest import client, db_path, make_client, settings, template_db, vm

__all__ = ["client", "db_path", "make_client", "settings", "template_db", "vm"]

# A real `vkmmu serve` on a free loopback port (the end-to-end tests' fixture).
from tests.e2e.test_server import server  # noqa: E402, F401
