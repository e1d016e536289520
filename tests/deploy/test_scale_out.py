"""The start sequence docker-compose.yml describes, run for real with local processes:
`vkmmu migrate` once, two `vkmmu serve` on one PostgreSQL database, nginx in front with the
shipped config. A VM created through the proxy stays on one replica; when that replica stops,
the other serves it after catching up with the journal; when it comes back, the VM returns
to it with every change the other made."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.deploy.compose import INTERPOLATED, environment, replicas, services
from tests.deploy.procs import (
    Replica,
    free_port,
    nginx_binary,
    render_nginx_conf,
    run_vkmmu,
    start_nginx,
    stop,
    wait_http,
)
from tests.persistence.conftest import scratch_pg_database

pytestmark = pytest.mark.e2e

PG_URL = os.environ.get("VKMMU_TEST_PG_URL")
MiB = 1 << 20
HVA = 0x7F00_0000_0000
UPSTREAM = "x-vkmmu-upstream"


@pytest.fixture
def database() -> Iterator[str]:
    require(bool(PG_URL), "PostgreSQL (VKMMU_TEST_PG_URL)")
    assert PG_URL is not None
    with scratch_pg_database(PG_URL) as url:
        yield url


def served_by(r: httpx.Response) -> str:
    """The replica address nginx used last for this answer (after a failover, the other)."""
    return r.headers[UPSTREAM].split(",")[-1].strip()


def test_compose_start_sequence_with_failover(database: str, tmp_path: Path) -> None:
    binary = nginx_binary()
    require(binary is not None, "nginx (.ci/deps/nginx.sh)")
    assert binary is not None

    # 1. The one-shot migrate service: its command and environment, our database.
    migrate = services()["migrate"]
    env = environment(migrate) | {"VKMMU_DATABASE_URL": database}
    done = run_vkmmu(*migrate["command"], env=env)
    assert done.returncode == 0, done.stderr
    assert "database schema at head" in done.stdout

    # 2. The replicas, each with its service's environment, on the same database.
    reps = [
        Replica(name, environment(svc) | {"VKMMU_DATABASE_URL": database}, tmp_path)
        for name, svc in replicas().items()
    ]
    assert len(reps) == 2
    # 3. nginx in front, with the shipped config rendered for loopback.
    conf = tmp_path / "nginx.conf"
    proxy_port = free_port()
    conf.write_text(render_nginx_conf(proxy_port, [r.port for r in reps], tmp_path))
    proxy = None
    try:
        for rep in reps:
            rep.start()
        proxy = start_nginx(binary, conf, tmp_path, tmp_path / "nginx.log")
        base = f"http://127.0.0.1:{proxy_port}"
        wait_http(f"{base}/healthz", proxy, tmp_path / "nginx.log")
        by_addr = {f"127.0.0.1:{r.port}": r for r in reps}
        _exercise(base, by_addr)
    finally:
        if proxy is not None:
            stop(proxy)
        for rep in reps:
            rep.stop()


def _exercise(base: str, by_addr: dict[str, Replica]) -> None:
    admin = {"Authorization": f"Bearer {INTERPOLATED['VKMMU_ADMIN_TOKEN']}"}
    with httpx.Client(base_url=base, timeout=30, headers=admin) as c:
        r = c.post("/v1/vms", json={"name": "scale-out", "vm_type": "KVM_X86_DEFAULT_VM"})
        assert r.status_code == 201, r.text
        vm = r.json()["id"]

        r = c.put(
            f"/v1/vms/{vm}/memslots/0",
            json={"guest_phys_addr": 0, "memory_size": 4 * MiB, "userspace_addr": hex(HVA)},
        )
        assert r.status_code == 200, r.text
        owner = by_addr[served_by(r)]
        (other,) = (rep for rep in by_addr.values() if rep is not owner)

        # The other replica loads the VM now (directly, not through the proxy): its copy in
        # memory is about to go stale.
        r = httpx.get(f"{other.base}/v1/vms/{vm}/memslots", timeout=30, headers=admin)
        assert r.status_code == 200 and len(r.json()["items"]) == 1

        # Every call on the VM goes to the same replica: the hash of its id.
        for i in range(4):
            r = c.post(
                f"/v1/vms/{vm}/vcpus/0/accesses",
                json={"gpa": i * MiB, "size": MiB, "access": "write"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["mapped"] == 256
            assert by_addr[served_by(r)] is owner
        r = c.get(f"/v1/vms/{vm}/stats")
        before = r.json()
        version = r.headers["etag"]
        assert by_addr[served_by(r)] is owner
        assert before["pages_4k"] == 1024

        # The owner stops: the other replica serves the VM, caught up with the journal.
        owner.stop()
        r = c.get(f"/v1/vms/{vm}/stats")
        assert r.status_code == 200, r.text
        assert by_addr[served_by(r)] is other
        assert r.headers["etag"] == version
        assert r.json() == before

        # ... and changes it: a POST is failed over too (it never reached the stopped one).
        r = c.request("DELETE", f"/v1/vms/{vm}/memslots/0")
        assert r.status_code == 200, r.text
        assert by_addr[served_by(r)] is other
        assert r.json()["zap"]["sptes_zapped_total"] == 1024
        r = c.post(
            f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4096, "access": "read"}
        )
        assert r.status_code == 200 and r.json()["exit"] is not None  # no memslot: MMIO exit
        after = c.get(f"/v1/vms/{vm}/stats")
        assert by_addr[served_by(after)] is other
        assert after.json()["pages_4k"] == 0

        # The owner comes back (same address): once nginx retries it (fail_timeout), the VM
        # is routed to it again and it serves the state the other replica left.
        owner.start()
        deadline = time.monotonic() + 30
        while True:
            r = c.get(f"/v1/vms/{vm}/stats")
            assert r.status_code == 200, r.text
            if by_addr[served_by(r)] is owner:
                break
            assert time.monotonic() < deadline, "the VM never went back to its replica"
            time.sleep(0.5)
        assert r.headers["etag"] == after.headers["etag"]
        assert r.json() == after.json()
