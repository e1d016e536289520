"""A real `vkmmu serve` process (uvicorn) on a free loopback port, driven over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

MiB = 1 << 20
HVA = 0x7F00_0000_0000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vkmmu_command() -> list[str]:
    script = Path(sys.executable).parent / "vkmmu"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


class Server:
    """`vkmmu serve` on a free loopback port: SQLite file `db`, or `url` with extra `env`."""

    def __init__(
        self, db: Path, log: Path, *, url: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.db = db
        self.log = log
        self.url = url or f"sqlite+aiosqlite:///{db}"
        self.env = env or {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = os.environ | {
            "VKMMU_DATABASE_URL": self.url,
            "VKMMU_LOG_LEVEL": "INFO",
            **self.env,
        }
        cmd = [*vkmmu_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in time: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, and check the shutdown was graceful (the service stopped cleanly)."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("server did not stop on SIGTERM") from None
        # uvicorn re-raises the signal it handled once it has shut down, hence -SIGTERM.
        assert code in (0, -signal.SIGTERM), code
        assert "Application shutdown complete" in self.log.read_text(), self.log.read_text()


@contextmanager
def running(tmp_path: Path) -> Iterator[Server]:
    """A started `vkmmu serve` (settings from the environment), stopped afterwards."""
    srv = Server(tmp_path / "vkmmu.db", tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running(tmp_path) as srv:
        yield srv


def test_vm_memslot_access_delete_flow_survives_restart(server: Server) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post("/v1/vms", json={"name": "e2e", "vm_type": "KVM_X86_DEFAULT_VM"})
        assert r.status_code == 201, r.text
        vm = r.json()["id"]
        assert r.headers["x-request-id"]

        r = c.put(
            f"/v1/vms/{vm}/memslots/0",
            json={"guest_phys_addr": "0x0", "memory_size": 2 * MiB, "userspace_addr": hex(HVA)},
        )
        assert r.status_code == 200, r.text
        assert r.json()["change"] == "create"

        r = c.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 8 * 4096})
        assert r.status_code == 200, r.text
        assert r.json()["mapped"] == 8
        r = c.post(f"/v1/vms/{vm}/vcpus/0/store", json={"gpa": 64, "data": "c0ffee"})
        assert r.json() == {"exit": None}

        # A rejected call: the errno, over real HTTP.
        r = c.put(
            f"/v1/vms/{vm}/memslots/1",
            json={"guest_phys_addr": 4096, "memory_size": 4096, "userspace_addr": 0},
        )
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["errno_name"] == "EEXIST"

        r = c.get(f"/v1/vms/{vm}")
        version = r.headers["etag"]

    # The VM survives a restart of the service: same state, same version.
    server.stop()
    server.start()
    with httpx.Client(base_url=server.base, timeout=30) as c:
        r = c.get(f"/v1/vms/{vm}")
        assert r.status_code == 200
        assert r.headers["etag"] == version
        r = c.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 64, "len": 3})
        assert r.json() == {"data": "c0ffee", "exit": None}
        assert c.get(f"/v1/vms/{vm}/stats").json()["pages_4k"] == 8

        r = c.delete(f"/v1/vms/{vm}/memslots/0")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["change"] == "delete"
        assert body["zap"]["path"] == "zap_all_fast"
        assert c.get(f"/v1/vms/{vm}/memslots").json() == {"items": [], "next_cursor": None}
        r = c.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 64, "len": 3})
        assert r.json()["exit"]["reason"] == "KVM_EXIT_MMIO"
        assert c.get(f"/v1/vms/{vm}/audit").json()["ok"] is True
        assert f'vm="{vm}"' in c.get("/metrics").text
        assert c.delete(f"/v1/vms/{vm}").status_code == 200
        assert c.get(f"/v1/vms/{vm}").status_code == 404


def test_zap_stream_ends_cleanly_when_its_vm_is_deleted(server: Server) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        vm = c.post("/v1/vms", json={}).json()["id"]
        slot = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": hex(HVA)}
        assert c.put(f"/v1/vms/{vm}/memslots/0", json=slot).status_code == 200
        assert c.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0}).status_code == 200
        zap = {"scope": "all", "roots": "shared"}
        assert c.post(f"/v1/vms/{vm}/zaps", json=zap).status_code == 200
        chunks: list[bytes] = []
        with c.stream("GET", f"/v1/vms/{vm}/zaps/stream", params={"timeout": 60}) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                chunks.append(chunk)
                if b"event: zap" in b"".join(chunks) and len(chunks) == 1:
                    assert c.delete(f"/v1/vms/{vm}").status_code == 200
        # The whole chunked body arrived (no RemoteProtocolError), ending with why.
        body = b"".join(chunks).decode()
        assert body.endswith('event: end\ndata: {"reason": "vm_deleted"}\n\n'), body
    log = server.log.read_text()
    assert '"level": "ERROR"' not in log and "Traceback" not in log, log[-3000:]
