"""A real `vkmmu serve` process: clean restarts keep state, stats and memory contents;
`kill -9` at random moments under a load of mutating calls loses nothing acknowledged."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.engine.ops import parse

HVA = 0x7F00_0000_0000
SLOT_SIZE = 64 << 20
ROUNDS = 3  # kills per test
CALLS_PER_ROUND = 400  # upper bound; the kill usually lands well before
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `vkmmu serve` on loopback, started and stopped (or killed) by the test."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.db_url, self.workdir = db_url, workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "VKMMU_DATABASE_URL": self.db_url,
            "VKMMU_SNAPSHOT_EVERY": "25",
            "VKMMU_LOG_LEVEL": "WARNING",
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Clean shutdown (SIGTERM): the lifespan takes shutdown snapshots."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = Server(db_url, tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _observable(c: httpx.Client, vm: str) -> dict[str, Any]:
    def get(path: str) -> Any:
        r = c.get(f"/v1/vms/{vm}{path}")
        assert r.status_code == 200, r.text
        return r.json()

    mem = c.post(f"/v1/vms/{vm}/host-memory/read", json={"userspace_addr": HVA, "len": 1 << 16})
    assert mem.status_code == 200, mem.text
    return {
        "vm": get(""),
        "memslots": get("/memslots"),
        "stats": get("/stats"),
        "roots": get("/roots"),
        "audit": get("/audit"),
        "memory": mem.json(),
    }


def _setup_vm(c: httpx.Client) -> str:
    r = c.post("/v1/vms", json={"name": "crash", "vcpus": 2})
    assert r.status_code == 201, r.text
    vm = str(r.json()["id"])
    r = c.put(
        f"/v1/vms/{vm}/memslots/0",
        json={"flags": 0, "guest_phys_addr": 0, "memory_size": SLOT_SIZE, "userspace_addr": HVA},
    )
    assert r.status_code == 200, r.text
    return vm


def test_clean_restart_keeps_everything(server: Server) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        vm = _setup_vm(c)
        for i in range(40):
            c.post(
                f"/v1/vms/{vm}/host-memory/write",
                json={"userspace_addr": HVA + 64 * i, "data": f"{i:08x}"},
            ).raise_for_status()
            c.post(
                f"/v1/vms/{vm}/vcpus/{i % 2}/accesses",
                json={"gpa": (i * 0x10000) % SLOT_SIZE, "size": 0x8000, "access": "write"},
            ).raise_for_status()
        before = _observable(c, vm)
    assert before["audit"]["ok"] is True
    server.stop()
    server.start()
    with httpx.Client(base_url=server.base, timeout=30) as c:
        assert _observable(c, vm) == before
        snaps = c.get(f"/v1/vms/{vm}/snapshots").json()
        kinds = {s["kind"] for s in (snaps["items"] if isinstance(snaps, dict) else snaps)}
        assert "shutdown" in kinds


def test_kill9_loses_nothing_acknowledged(server: Server) -> None:
    rng = random.Random(int(os.environ.get("VKMMU_CRASH_SEED", "5")))
    acked: dict[int, str] = {}  # call number -> the 4 bytes it wrote, for every 2xx answer
    with httpx.Client(base_url=server.base, timeout=30) as c:
        vm = _setup_vm(c)
    n = 0
    per_round: list[int] = []  # calls acknowledged in each round
    for _round in range(ROUNDS):
        acked_before = len(acked)
        timer = threading.Timer(rng.uniform(0.3, 1.5), server.kill9)
        timer.start()
        with httpx.Client(base_url=server.base, timeout=30) as c:
            for _ in range(CALLS_PER_ROUND):
                data = f"{n:08x}"
                try:
                    r = c.post(
                        f"/v1/vms/{vm}/host-memory/write",
                        json={"userspace_addr": HVA + 4 * n, "data": data},
                    )
                    if n % 3 == 0:
                        c.post(
                            f"/v1/vms/{vm}/vcpus/0/accesses",
                            json={"gpa": (4 * n) & ~0xFFF, "access": "write"},
                        )
                except httpx.HTTPError:
                    break  # the server died under us: this call was not acknowledged
                assert r.status_code == 200, r.text
                acked[n] = data
                n += 1
        timer.join()
        server.start()
        with httpx.Client(base_url=server.base, timeout=30) as c:
            r = c.post(
                f"/v1/vms/{vm}/host-memory/read", json={"userspace_addr": HVA, "len": 4 * (n + 1)}
            )
            assert r.status_code == 200, r.text
            mem = bytes.fromhex(r.json()["data"])
            for i, data in acked.items():
                assert mem[4 * i : 4 * i + 4].hex() == data, f"acknowledged call {i} lost"
            audit = c.get(f"/v1/vms/{vm}/audit").json()
            assert audit["ok"] is True, audit
        per_round.append(len(acked) - acked_before)
        print(f"round {_round}: {per_round[-1]} calls acknowledged")
        n += 1  # the in-flight call may or may not have landed: never reuse its address
    # Each round acknowledged something before its kill (a restarted server that answered
    # nothing would leave the checks above vacuous for that round).
    assert all(k > 0 for k in per_round), per_round


def _serial_replay(db_url: str, vm: str) -> Any:
    """The VM rebuilt by applying its journal, in order, to a fresh engine VM."""
    from sqlalchemy import create_engine, select

    from app.db.models import JournalRecord, VmRow
    from app.db.session import sync_url
    from app.engine.vm import Vm
    from app.services.vms import datetime_to_us, us_to_engine_time

    engine = create_engine(sync_url(db_url))
    with engine.connect() as conn:
        row = conn.execute(select(VmRow).where(VmRow.id == vm)).one()
        recs = conn.execute(
            select(JournalRecord).where(JournalRecord.vm_id == vm).order_by(JournalRecord.seq)
        ).all()
    engine.dispose()
    ca = row.create_args
    serial = Vm.create(
        vm_type=ca["vm_type"], vcpus=ca["vcpus"], paging_levels=ca["paging_levels"], name=ca["name"]
    )
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1))
    for r in recs:
        try:
            serial.apply(parse(r.op, r.args), at=us_to_engine_time(datetime_to_us(r.at)))
        except Exception as e:  # a journaled error must come back on replay
            assert r.error is not None and r.error["errno"] == getattr(e, "errno", None)
    return serial


def test_two_processes_one_postgres(pg_url: str, tmp_path: Path) -> None:
    a, b = Server(pg_url, tmp_path), Server(pg_url, tmp_path)
    a.start()
    b.start()
    try:
        with httpx.Client(base_url=a.base, timeout=30) as c:
            vm = _setup_vm(c)
        errors: list[BaseException] = []

        def hammer(srv: Server, k: int) -> None:
            try:
                with httpx.Client(base_url=srv.base, timeout=60) as c:
                    for i in range(40):
                        n = k * 1000 + i
                        c.post(
                            f"/v1/vms/{vm}/host-memory/write",
                            json={"userspace_addr": HVA + 4 * n, "data": f"{n:08x}"},
                        ).raise_for_status()
                        gpa = ((k * 7 + i) * 0x20000) % SLOT_SIZE
                        c.post(
                            f"/v1/vms/{vm}/vcpus/{k % 2}/accesses",
                            json={"gpa": gpa, "size": 0x10000, "access": "write"},
                        ).raise_for_status()
                        if i % 5 == 4:
                            c.post(
                                f"/v1/vms/{vm}/host-memory/discard",
                                json={"userspace_addr": HVA + gpa, "len": 0x4000},
                            ).raise_for_status()
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=hammer, args=(srv, k)) for k, srv in enumerate([a, b, a, b])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with (
            httpx.Client(base_url=a.base, timeout=30) as ca,
            httpx.Client(base_url=b.base, timeout=30) as cb,
        ):
            seen_a, seen_b = _observable(ca, vm), _observable(cb, vm)
        assert seen_a == seen_b
        assert seen_a["audit"]["ok"] is True
        assert seen_a["vm"]["version"] == 1 + 4 * (40 + 40 + 8)
        serial = _serial_replay(pg_url, vm)
        assert serial.stats() == seen_a["stats"]
        assert serial.host_read(HVA, 1 << 16) == seen_a["memory"]
        assert serial.audit()["ok"] is True
    finally:
        a.stop()
        b.stop()
