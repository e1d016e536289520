"""The header size limit of a real `vkmmu serve`: kept by the HTTP parser as the bytes
arrive (431 problem, connection closed), not after a huge head was read and buffered."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import Server

pytestmark = pytest.mark.e2e

LIMIT = 4096


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Server]:
    srv = Server(
        tmp_path / "vkmmu.db",
        tmp_path / "server.log",
        env={"VKMMU_MAX_HEADER_BYTES": str(LIMIT)},
    )
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


def _raw(server: Server, head: bytes, *, then: bytes = b"") -> bytes:
    """Send `head` (and `then`) on a fresh connection; the answer (head and body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        try:
            s.sendall(head + then)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending: read what it said
        out = b""
        while b"\r\n\r\n" not in out or len(out.partition(b"\r\n\r\n")[2]) < _length(out):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _length(raw: bytes) -> int:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_head_past_the_limit_is_431(limited: Server) -> None:
    with httpx.Client(base_url=limited.base, timeout=30) as c:
        assert c.get("/healthz", headers={"X-Fits": "a" * (LIMIT - 500)}).status_code == 200
        r = c.get("/healthz", headers={"X-Big": "a" * (LIMIT + 1)})
        assert r.status_code == 431
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 431 and str(LIMIT) in r.json()["detail"]
        # Many small headers count together, the request target too.
        many = {f"X-H{i}": "b" * 60 for i in range(LIMIT // 60)}
        assert c.get("/healthz", headers=many).status_code == 431
        assert c.get("/healthz", params={"q": "c" * LIMIT}).status_code == 431
        assert c.get("/healthz").status_code == 200  # the server is fine


def test_a_huge_head_is_refused_before_it_is_read(limited: Server) -> None:
    """A 64 MiB header that never ends: answered 431 after about the limit, not read
    through; a head cut in a later packet is no different."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    raw = _raw(limited, head, then=b"a" * (64 << 20))
    status, body = _status_and_body(raw)
    assert status == 431
    assert json.loads(body)["title"] == "Request Header Fields Too Large"
    assert b"Invalid HTTP request" not in (limited.log.read_bytes())
    with httpx.Client(base_url=limited.base, timeout=30) as c:
        assert c.get("/readyz").status_code == 200


def test_a_small_head_with_a_large_body_is_served(limited: Server) -> None:
    """The limit is the head's: a body far larger than it, read in the same packets as the
    end of the head, is not counted."""
    with httpx.Client(base_url=limited.base, timeout=30) as c:
        r = c.post("/v1/vms", json={"name": "x" * 60, "pad": "y" * (LIMIT * 16)})
        assert r.status_code == 422, r.text  # the body's unknown key: validation, not 431
    body = json.dumps({"name": "e2e"}).encode() + b" " * (LIMIT * 8)
    head = (
        b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    status, _ = _status_and_body(_raw(limited, head[:20], then=head[20:] + body))
    assert status == 201
