"""GET and DELETE /v1/vms/{vm}/snapshots/{id}, snapshot labels, the manual snapshot cap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from app.services.vms import VmService
from tests.persistence.conftest import sqlite_url


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    url = sqlite_url(tmp_path)
    app = create_app(Settings(database_url=url), service=VmService(url, max_manual_snapshots=2))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def test_snapshot_get_delete_label_and_cap(client: httpx.AsyncClient) -> None:
    vm = (await client.post("/v1/vms", json={"name": "s"})).json()["id"]
    base = f"/v1/vms/{vm}/snapshots"
    r = await client.post(base, json={"label": "golden"})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["label"] == "golden"
    unlabelled = (await client.post(base)).json()
    assert unlabelled["label"] is None
    r = await client.post(base, json={})
    assert r.status_code == 507 and r.json()["errno_name"] == "ENOMEM"
    r = await client.get(f"{base}/{snap['id']}")
    assert r.status_code == 200 and r.json()["label"] == "golden"
    assert r.headers["etag"] == '"0"'
    r = await client.delete(f"{base}/{snap['id']}")
    assert r.status_code == 204 and r.headers["etag"] == '"0"'
    assert (await client.get(f"{base}/{snap['id']}")).status_code == 404
    assert (await client.delete(f"{base}/{snap['id']}")).status_code == 404
    r = await client.post(base, json={"label": "x" * 101})
    assert r.status_code == 422
