"""Replay and what-if tests use the API suite's in-process app (fresh SQLite per test)."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import client, db_path, make_client, settings, template_db, vm

TRACES = Path(__file__).resolve().parents[2] / "examples" / "traces"

__all__ = ["TRACES", "client", "db_path", "make_client", "settings", "template_db", "vm"]
