"""Docs offline: Swagger UI and Redoc from the app's own assets; CORS only when configured."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from app.services.lifecycle import migrate
from tests.conftest import require

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def test_docs_pages_use_local_assets(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        r = await client.get(page)
        assert r.status_code == 200
        assert "cdn." not in r.text and "googleapis" not in r.text
        assert "/docs-assets/" in r.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = await client.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000


async def test_no_cors_by_default(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/capabilities", headers={"Origin": "https://dash.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_cors_origins(make_client: object) -> None:
    client = await make_client(cors_origins="https://dash.example, http://localhost:3000")  # type: ignore[operator]
    r = await client.get("/v1/capabilities", headers={"Origin": "https://dash.example"})
    assert r.headers["access-control-allow-origin"] == "https://dash.example"
    assert "etag" in r.headers["access-control-expose-headers"].lower()
    pre = await client.options(
        "/v1/vms",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,if-match",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = await client.get("/v1/capabilities", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path}/vkmmu.db"
    migrate(url)
    app = create_app(Settings(database_url=url))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


def test_docs_render_in_headless_chromium_without_network(server: str, tmp_path: Path) -> None:
    require(CHROMIUM is not None, "Chromium (.ci/deps/chromium.sh)")
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        # No network but loopback: every other host fails to resolve, any proxy use fails.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--virtual-time-budget=15000",
        "--dump-dom",
    ]
    for page, marker in (("/docs", 'class="opblock'), ("/redoc", "vms_create")):
        out = subprocess.run(
            [CHROMIUM, *flags, server + page], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        # Rendered from the spec: operations exist in the DOM only once the script ran.
        assert marker in out.stdout, out.stdout[:2000]
