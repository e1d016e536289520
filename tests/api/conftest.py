"""The app in-process (httpx.ASGITransport) on a fresh SQLite database per test.

The schema is migrated once per session into a template file that each test copies: the
service runs Alembic's head schema, as in production, without paying for it every test.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from app.services.lifecycle import migrate
from app.services.vms import VmService


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "vkmmu.db"
    migrate(sqlite_url(path))
    return path


@pytest.fixture
def db_path(tmp_path: Path, template_db: Path) -> Path:
    path = tmp_path / "vkmmu.db"
    shutil.copy(template_db, path)
    return path


@pytest.fixture
def settings(db_path: Path) -> Settings:
    return Settings(database_url=sqlite_url(db_path), max_body_bytes=64 * 1024)


@pytest.fixture
async def make_client(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Builds a started app + client; everything is stopped at teardown."""
    stack: list[Any] = []

    async def make(service: VmService | None = None, **overrides: Any) -> httpx.AsyncClient:
        s = settings.model_copy(update=overrides)
        svc = service or VmService(
            s.database_url,
            snapshot_every=s.snapshot_every,
            run_migrations=False,
            page_table_budget_bytes=s.page_table_budget_bytes,
            max_loaded_vms=s.max_loaded_vms,
        )
        app = create_app(s, service=svc)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stack.append(lifespan)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://vkmmu.test"
        )
        stack.append(client)
        client.app = app  # type: ignore[attr-defined]
        return client

    yield make
    for obj in reversed(stack):
        await obj.__aexit__(None, None, None)


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> httpx.AsyncClient:
    return await make_client()  # type: ignore[no-any-return]


@pytest.fixture
async def vm(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/vms", json={"name": "t"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(autouse=True)
def _answers_are_complete(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An engine answer key that the response model does not declare fails the test."""
    yield
    undeclared = [r.getMessage() for r in caplog.records if r.name == "vkmmu.api.undeclared"]
    assert not undeclared, undeclared
