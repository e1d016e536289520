"""A real `vkmmu serve`: SIGTERM ends open event streams with `end` before the server stops
(uvicorn would otherwise wait for them)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import Server

pytestmark = pytest.mark.e2e


def test_sigterm_ends_open_streams_cleanly(tmp_path: Path) -> None:
    srv = Server(tmp_path / "vkmmu.db", tmp_path / "server.log")
    srv.start()
    lines: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with (
            httpx.Client(base_url=srv.base, timeout=60) as c,
            c.stream("GET", "/v1/events", params={"heartbeat": 0.2}) as r,
        ):
            assert r.status_code == 200
            opened.set()
            lines.extend(r.iter_lines())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(30)
    vm = httpx.post(f"{srv.base}/v1/vms", json={}, timeout=30).json()["id"]
    time.sleep(0.5)
    start = time.monotonic()
    srv.stop()  # SIGTERM; asserts a graceful exit
    reader.join(30)
    assert not reader.is_alive()
    assert time.monotonic() - start < 15
    text = "\n".join(lines)
    assert f'"vm":"{vm}"' in text
    assert lines[-3:-1] == ["event: end", 'data: {"reason":"shutdown"}']
