"""Alembic environment: runs migrations on a sync connection (pysqlite / psycopg).

`app.services.lifecycle.migrate()` hands over an open connection in
`config.attributes["connection"]`; the `alembic` command line builds one from the URL.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from app.db.models import Base
from app.db.session import sync_url

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("VKMMU_DATABASE_URL")
    if not url:
        from app.config import get_settings

        url = get_settings().database_url
    return sync_url(url).render_as_string(hide_password=False)


def _configure(**kw: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=True,
        compare_type=True,
        **kw,  # type: ignore[arg-type]
    )


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
