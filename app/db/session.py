"""Engines and sessions for SQLite (pysqlite) and PostgreSQL (psycopg 3).

Sessions are synchronous and used from worker threads: the service runs each VM call
(database work and engine work together) in one thread hop. Through an async driver the
same transaction costs ~20 thread hops (aiosqlite runs every cursor step on its own
thread): 3 ms per journaled call on SQLite instead of 0.4 ms.

Writers must be serialised per VM across processes. PostgreSQL does it with
`SELECT ... FOR UPDATE` on the VM row. SQLite has no row locks, so write transactions
start with `BEGIN IMMEDIATE`, which takes the database's write lock up front: two
writers never both read `last_seq` and then race to append the same record.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.db.jsoncodec import json_dumps, json_loads
from app.db.repository import JournalWriter

# Seconds a SQLite writer waits for the write lock before giving up ("database is locked").
SQLITE_BUSY_TIMEOUT_S = 60.0


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sync_url(url: str | URL) -> URL:
    """The sync driver for a URL given with an async one (`sqlite+aiosqlite://` is the
    documented default form of `VKMMU_DATABASE_URL`) or with none."""
    u = make_url(url)
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite" and driver != "pysqlite":
        return u.set(drivername="sqlite")
    if backend == "postgresql" and driver != "psycopg":
        return u.set(drivername="postgresql+psycopg")
    return u


# PRAGMA synchronous in WAL mode. NORMAL: a commit survives the process being killed (the
# WAL is in the OS's hands) but not a power loss or OS crash, which may drop the last
# commits; FULL: every commit is fsynced before it returns (VKMMU_SQLITE_SYNCHRONOUS=full).
SQLITE_SYNCHRONOUS = ("normal", "full")


def _make_sqlite_engine(url: URL, *, immediate: bool, synchronous: str = "normal") -> Engine:
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite synchronous must be one of {SQLITE_SYNCHRONOUS}")
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        json_serializer=json_dumps,
        json_deserializer=json_loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so our BEGIN is the one that runs.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # WAL: readers never block the writer.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """The engines of one database: `write()` sessions lock, `read()` sessions do not."""

    def __init__(self, url: str | URL, *, sqlite_synchronous: str = "normal") -> None:
        self.url = sync_url(url)
        self.sqlite = is_sqlite(self.url)
        self._write_engine: Engine
        self._read_engine: Engine
        if self.sqlite:
            sync = sqlite_synchronous
            self._write_engine = _make_sqlite_engine(self.url, immediate=True, synchronous=sync)
            self._read_engine = _make_sqlite_engine(self.url, immediate=False, synchronous=sync)
        else:
            # A bounded connect: readiness must answer "unreachable", not hang.
            self._write_engine = create_engine(
                self.url,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 10},
                json_serializer=json_dumps,
                json_deserializer=json_loads,
            )
            self._read_engine = self._write_engine
        self._dbapi_error: type[Exception] = self._write_engine.dialect.loaded_dbapi.Error
        self.journal = JournalWriter(self._write_engine.dialect)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        self._read = sessionmaker(self._read_engine, expire_on_commit=False)

    @property
    def engine(self) -> Engine:
        return self._write_engine

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on normal exit and rolls back on an exception."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """A write transaction on a bare DBAPI cursor (SQLite: BEGIN IMMEDIATE), for the
        journal append. Driver errors come out as SQLAlchemy's (an outage stays a 503)."""
        conn = self._write_engine.raw_connection()
        try:
            with self._translated():
                cur = conn.cursor()
                try:
                    if self.sqlite:
                        cur.execute("BEGIN IMMEDIATE")
                    yield cur
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                finally:
                    cur.close()
        finally:
            conn.close()

    @contextmanager
    def cursor_of(self, session: Session) -> Iterator[Any]:
        """A bare DBAPI cursor inside `session`'s transaction (errors translated likewise)."""
        cur = session.connection().connection.cursor()
        try:
            with self._translated():
                yield cur
        finally:
            cur.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Driver errors come out as SQLAlchemy's DBAPIError (an outage stays a 503)."""
        try:
            yield
        except self._dbapi_error as e:
            raise sa_exc.DBAPIError.instance(
                None, None, e, self._dbapi_error, dialect=self._write_engine.dialect
            ) from e

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            self._read_engine.dispose()
