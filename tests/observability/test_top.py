"""`vkmmu top` against a real server: kernel stat names and zap counters, per VM or summed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import Server, vkmmu_command

pytestmark = pytest.mark.e2e
MiB = 1 << 20
HVA = 0x7F00_0000_0000


def top(server: Server, *args: str) -> str:
    r = subprocess.run(
        [*vkmmu_command(), "top", "--url", server.base, "--once", "--interval", "0.2", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"COLUMNS": "160"},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def row(out: str, name: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_top_shows_kernel_stats_and_zap_counters(server: Server) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        vms = []
        for _ in range(2):
            vm = c.post("/v1/vms", json={}).json()["id"]
            body = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}
            assert c.put(f"/v1/vms/{vm}/memslots/0", json=body).status_code == 200
            r = c.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 8 * 4096})
            assert r.status_code == 200
            vms.append(vm)
        assert c.delete(f"/v1/vms/{vms[0]}/memslots/0").status_code == 200
        stats = [c.get(f"/v1/vms/{vm}/stats").json() for vm in vms]

    one = top(server, "--vm", vms[0])
    assert vms[0] in one and vms[1] not in one
    assert row(one, "pf_fixed")[1] == str(stats[0]["pf_fixed"])
    assert row(one, "pages_4k")[1] == "0"
    assert row(one, "zaps_all_fast (vkmmu)")[1] == "1"
    assert row(one, "remote_tlb_flush")[1] == str(stats[0]["remote_tlb_flush"])

    both = top(server)
    assert "2 VM(s)" in both
    assert row(both, "pf_fixed")[1] == str(stats[0]["pf_fixed"] + stats[1]["pf_fixed"])
    assert row(both, "pages_4k")[1] == "8"
    assert row(both, "zaps_total_sptes (vkmmu)")[1] == "8"


def test_top_says_when_the_service_is_not_there() -> None:
    r = subprocess.run(
        [*vkmmu_command(), "top", "--url", "http://127.0.0.1:9", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("vkmmu top: http://127.0.0.1:9:")


def test_top_sends_a_token_and_shows_the_tenants_vms_only(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "vkmmu.db", tmp_path / "server.log", env={"VKMMU_ADMIN_TOKEN": "t0p"}
    )
    server.start()
    try:
        admin = {"Authorization": "Bearer t0p"}
        with httpx.Client(base_url=server.base, timeout=30, headers=admin) as c:
            vms, tokens = {}, {}
            for tenant in ("a", "b"):
                tokens[tenant] = c.post("/v1/tokens", json={"tenant": tenant}).json()["token"]
                head = {"Authorization": f"Bearer {tokens[tenant]}"}
                vms[tenant] = c.post("/v1/vms", json={}, headers=head).json()["id"]
        mine = top(server, "--token", tokens["a"])
        assert "1 VM(s)" in mine and vms["a"] in mine and vms["b"] not in mine
        r = subprocess.run(
            [*vkmmu_command(), "top", "--url", server.base, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "VKMMU_ADMIN_TOKEN"},
        )
        assert r.returncode == 1 and "401" in r.stderr and "--token" in r.stderr
    finally:
        server.stop()
