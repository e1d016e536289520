"""Schema upgrades (Alembic) for the service's database.

The service never calls `create_all`: the schema is whatever Alembic's head says.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import URL

from app.db.session import sync_url

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = REPO_ROOT / "migrations"
# Any constant works: it only has to be the same in every vkmmu process.
_PG_MIGRATION_LOCK_KEY = 0x766B6D6D75


def alembic_config(url: str | URL | None = None) -> Config:
    ini = REPO_ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates '%': a password may contain one.
        rendered = sync_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _run(url: str | URL, action: str, revision: str) -> None:
    cfg = alembic_config(url)
    engine = create_engine(sync_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several processes may start at once: one migrates, the others wait and
                # then find the schema at head. Released at commit.
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK_KEY}
                )
            cfg.attributes["connection"] = conn
            if action == "upgrade":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
    finally:
        engine.dispose()


def migrate(url: str | URL, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (synchronous; call via to_thread in a loop)."""
    log.info("migrating database schema to %s", revision)
    _run(url, "upgrade", revision)


def downgrade(url: str | URL, revision: str = "base") -> None:
    _run(url, "downgrade", revision)
