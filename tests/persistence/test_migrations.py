"""Alembic owns the schema: upgrade from empty, down to base and up again, on SQLite and
PostgreSQL; the models and the migrations agree (autogenerate finds nothing)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.models import Base
from app.db.session import sync_url
from app.services.lifecycle import downgrade, head_revision, migrate
from app.services.vms import build_service

TABLES = {"vms", "journal", "snapshots", "tokens", "auth_keys"}


def tables(url: str) -> set[str]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def diff(url: str) -> list[object]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    migrate(db_url)
    assert tables(db_url) == TABLES
    assert diff(db_url) == []
    downgrade(db_url, "base")
    assert tables(db_url) == set()
    migrate(db_url)
    assert tables(db_url) == TABLES
    migrate(db_url)  # idempotent at head
    assert diff(db_url) == []


async def test_service_migrates_by_itself_and_reports_ready(db_url: str) -> None:
    svc = build_service(db_url)
    await svc.start()
    try:
        assert tables(db_url) == TABLES
        ready = await svc.ready()
        assert ready["ok"] is True and ready["database"] == "ok" and ready["schema"] == "ok"
    finally:
        await svc.stop()


async def test_ready_says_when_schema_is_behind(db_url: str) -> None:
    svc = build_service(db_url, run_migrations=False)
    await svc.start()
    try:
        ready = await svc.ready()
        assert ready["ok"] is False
        assert ready["schema"] == f"at None, expected {head_revision()}"
    finally:
        await svc.stop()
