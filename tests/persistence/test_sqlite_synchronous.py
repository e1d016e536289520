"""SQLite commit durability (issue 12): WAL with synchronous=NORMAL by default (a commit
survives the process being killed), FULL on request (also a power loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from app.config import Settings
from app.db.session import Database

# PRAGMA synchronous answers: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
NORMAL, FULL = 1, 2


def pragmas(db: Database) -> tuple[str, int]:
    with db.read() as s:
        mode = s.execute(text("PRAGMA journal_mode")).scalar_one()
        sync = s.execute(text("PRAGMA synchronous")).scalar_one()
    with db.write() as s:
        assert s.execute(text("PRAGMA synchronous")).scalar_one() == sync
    return mode, sync


@pytest.mark.parametrize(("setting", "expected"), [("normal", NORMAL), ("full", FULL)])
def test_both_engines_use_wal_and_the_chosen_synchronous(
    tmp_path: Path, setting: str, expected: int
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}", sqlite_synchronous=setting)
    try:
        assert pragmas(db) == ("wal", expected)
    finally:
        db.dispose()


def test_the_default_is_normal_and_the_setting_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert pragmas(db)[1] == NORMAL
    finally:
        db.dispose()
    assert Settings().sqlite_synchronous == "normal"
    monkeypatch.setenv("VKMMU_SQLITE_SYNCHRONOUS", "full")
    assert Settings().sqlite_synchronous == "full"
    monkeypatch.setenv("VKMMU_SQLITE_SYNCHRONOUS", "off")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValueError):
        Database(f"sqlite:///{tmp_path / 'y.db'}", sqlite_synchronous="off")
