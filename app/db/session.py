"""Async engines and sessions for SQLite (aiosqlite) and PostgreSQL (psycopg 3).

Writers must be serialised per VM across processes. PostgreSQL does it with
`SELECT ... FOR UPDATE` on the VM row. SQLite has no row locks, so write transactions
start with `BEGIN IMMEDIATE`, which takes the database's write lock up front: two
writers never both read `last_seq` and then race to append the same record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

# Seconds a SQLite writer waits for the write lock before giving up ("database is locked").
SQLITE_BUSY_TIMEOUT_S = 60.0


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def async_url(url: str | URL) -> URL:
    """The async driver for a URL given with a sync one (or none)."""
    u = make_url(url)
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite" and driver != "aiosqlite":
        return u.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql" and driver not in ("psycopg", "psycopg_async", "asyncpg"):
        return u.set(drivername="postgresql+psycopg")
    return u


def sync_url(url: str | URL) -> URL:
    """The sync driver for the same database (Alembic runs synchronously)."""
    u = make_url(url)
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite" and driver != "pysqlite":
        return u.set(drivername="sqlite")
    if backend == "postgresql" and driver != "psycopg":
        return u.set(drivername="postgresql+psycopg")
    return u


def _sqlite_pragmas(dbapi_conn: Any, immediate: bool) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; FULL: a commit is on disk before we answer.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cur.close()


def _make_sqlite_engine(url: URL, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so our BEGIN is the one that runs.
        dbapi_conn.isolation_level = None
        _sqlite_pragmas(dbapi_conn, immediate)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """The engines of one database: `write()` sessions lock, `read()` sessions do not."""

    def __init__(self, url: str | URL) -> None:
        self.url = async_url(url)
        self.sqlite = is_sqlite(self.url)
        if self.sqlite:
            self._write_engine = _make_sqlite_engine(self.url, immediate=True)
            self._read_engine = _make_sqlite_engine(self.url, immediate=False)
        else:
            self._write_engine = create_async_engine(self.url, pool_pre_ping=True)
            self._read_engine = self._write_engine
        self._write = async_sessionmaker(self._write_engine, expire_on_commit=False)
        self._read = async_sessionmaker(self._read_engine, expire_on_commit=False)

    @property
    def engine(self) -> AsyncEngine:
        return self._write_engine

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that commits on normal exit and rolls back on an exception."""
        async with self._write() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            await self._read_engine.dispose()
