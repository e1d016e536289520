"""The API fixtures (a started app on a fresh SQLite database per test), shared."""

from __future__ import annotations

from tests.api.conftest import client, db_path, make_client, settings, template_db, vm

__all__ = ["client", "db_path", "make_client", "settings", "template_db", "vm"]
