"""The `vkmmu` command and the settings it reads."""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app import cli, http_server
from app.cli import _display_url, main
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


def test_migrate_never_prints_the_database_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _display_url("postgresql+psycopg://app:s3cret@db:5432/vkmmu") == (
        "postgresql+psycopg://app:***@db:5432/vkmmu"
    )
    assert "s3cret" not in _display_url("postgresql://app:s3cret@db/x?sslmode=require")
    assert _display_url("not a url") == "the configured database"
    # The command itself, with the migration stubbed out (no PostgreSQL needed).
    monkeypatch.setenv("VKMMU_DATABASE_URL", "postgresql+psycopg://app:s3cret@db/vkmmu")
    monkeypatch.setattr("app.services.lifecycle.migrate", lambda url: None)
    assert main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "app:***@db/vkmmu" in out


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


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["serve", "--port", "99999"], {}, "--port / VKMMU_PORT"),
        (["serve"], {"VKMMU_SNAPSHOT_EVERY": "-1"}, "VKMMU_SNAPSHOT_EVERY"),
        (["serve"], {"VKMMU_PORT": "http"}, "VKMMU_PORT"),
        (["migrate"], {"VKMMU_MAX_BODY_BYTES": "0"}, "VKMMU_MAX_BODY_BYTES"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vkmmu: invalid settings: ")
    assert named in lines[0]
    assert "Traceback" not in out.err and out.out == ""


def test_bad_settings_from_the_console_script(tmp_path: Path) -> None:
    """The real command: exit status 2, one line on stderr, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKMMU_")}
    env["VKMMU_SNAPSHOT_EVERY"] = "-1"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "99999"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--port / VKMMU_PORT" in lines[0] and "VKMMU_SNAPSHOT_EVERY" in lines[0]
    assert "Traceback" not in proc.stderr


def test_tune_gc_freezes_what_startup_built_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        http_server.tune_gc()
        assert gc.get_threshold() == http_server.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_the_server_tunes_the_collector_once_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn
    from fastapi import FastAPI

    tuned: list[bool] = []
    monkeypatch.setattr(http_server, "tune_gc", lambda: tuned.append(True))
    app = FastAPI()
    server = cli._server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None), app)
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)  # what `serve` sets first
    await server.startup()
    try:
        assert tuned == [True]
    finally:
        await server.shutdown()
