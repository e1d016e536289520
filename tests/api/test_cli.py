"""The `vkmmu` command and the settings it reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.cli import main
from app.config import Settings
from app.services.lifecycle import head_revision


def test_migrate_brings_the_schema_to_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "m.db"
    monkeypatch.setenv("VKMMU_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    assert main(["migrate"]) == 0
    with sqlite3.connect(db) as conn:
        (rev,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert rev == head_revision()
    assert "head" in capsys.readouterr().out
    assert main(["migrate"]) == 0  # idempotent


def test_bad_arguments_exit_with_usage() -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "not-a-number"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "MAX_BODY_BYTES", "SNAPSHOT_EVERY", "PORT"):
        monkeypatch.delenv(f"VKMMU_{name}", raising=False)
    defaults = Settings()
    assert defaults.database_url == "sqlite+aiosqlite:///./vkmmu.db"
    assert defaults.max_body_bytes == 8 * 1024 * 1024
    assert defaults.snapshot_every == 1000
    monkeypatch.setenv("VKMMU_PORT", "9001")
    monkeypatch.setenv("VKMMU_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("VKMMU_SNAPSHOT_EVERY", "7")
    s = Settings()
    assert (s.port, s.max_body_bytes, s.snapshot_every) == (9001, 1024, 7)
    monkeypatch.setenv("VKMMU_PORT", "70000")
    with pytest.raises(ValueError):
        Settings()
