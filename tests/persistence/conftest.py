"""Databases for persistence tests: a SQLite file, and a scratch PostgreSQL database
when `VKMMU_TEST_PG_URL` is set (CI sets it; locally e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.db.session import sync_url
from app.services.engine_port import EnginePort
from app.services.vms import VmService
from tests.conftest import require
from tests.persistence.flavours import FLAVOURS, Flavour

PG_URL = os.environ.get("VKMMU_TEST_PG_URL")
BACKENDS = ["sqlite", "postgresql"]


def _wipe(url: str) -> None:
    engine = create_engine(sync_url(url))
    with engine.begin() as conn:
        for table in ("journal", "snapshots", "vms", "alembic_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()


@contextmanager
def scratch_pg_database(base_url: str) -> Iterator[str]:
    """A fresh database on the server of `base_url`, dropped afterwards.

    Where the role may not create databases, the given database itself is wiped instead.
    """
    name = f"vkmmu_t_{secrets.token_hex(6)}"
    admin = create_engine(sync_url(base_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        _wipe(base_url)
        try:
            yield base_url
        finally:
            _wipe(base_url)
        return
    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'vkmmu.db'}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    require(bool(PG_URL), "PostgreSQL (VKMMU_TEST_PG_URL)")
    with scratch_pg_database(PG_URL) as url:
        yield url


@pytest.fixture(params=FLAVOURS, ids=str)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """The real engine, then the stand-in."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pg_url() -> Iterator[str]:
    require(bool(PG_URL), "PostgreSQL (VKMMU_TEST_PG_URL)")
    with scratch_pg_database(PG_URL) as url:
        yield url


ServiceFactory = Callable[..., Awaitable[VmService]]


@pytest.fixture
async def make_service() -> AsyncIterator[ServiceFactory]:
    """Start services on demand; whatever a test leaves running is stopped at teardown."""
    started: list[VmService] = []

    async def make(url: str, engine: EnginePort | None = None, **kw: Any) -> VmService:
        svc = VmService(url, engine=engine, **kw)
        await svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        await svc.stop()
