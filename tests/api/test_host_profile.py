"""Host profiles over HTTP: VKMMU_HOST_* (the service's defaults), a VM's own `host` at
creation, GET /v1/vms/{vm} and /v1/capabilities, the NX recovery route, what-if variants,
and replay after a restart (the resolved profile is journaled)."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from app.config import Settings
from app.engine.revision import ENGINE_REV
from app.services.vms import VmService

from .helpers import HVA, MiB, assert_errno, new_vm, ok, put_slot

DEFAULT = {"enable_pml": False, "eager_page_split": True, "nx_huge_pages": False, "tdp_mmu": True}


async def thp_slot(client: httpx.AsyncClient, vm: str) -> None:
    body = {"userspace_addr": HVA, "len": 4 * MiB, "advice": "hugepage"}
    ok(await client.post(f"/v1/vms/{vm}/host-memory/advise", json=body))
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))


async def test_a_vm_has_the_default_profile_unless_it_asks(client: httpx.AsyncClient) -> None:
    caps = ok(await client.get("/v1/capabilities"))
    assert caps["host"] == DEFAULT
    vm = await new_vm(client)
    assert ok(await client.get(f"/v1/vms/{vm}"))["host"] == DEFAULT
    vm = await new_vm(client, host={"nx_huge_pages": True})
    assert ok(await client.get(f"/v1/vms/{vm}"))["host"] == DEFAULT | {"nx_huge_pages": True}
    r = await client.post("/v1/vms", json={"host": {"tdp_mmu": False}})
    body = assert_errno(r, errno.EOPNOTSUPP)
    assert "shadow MMU" in body["detail"]
    r = await client.post("/v1/vms", json={"host": {"pml": True}})
    assert r.status_code == 422


async def test_nx_recovery_route(client: httpx.AsyncClient) -> None:
    vm = await new_vm(client, host={"nx_huge_pages": True})
    await thp_slot(client, vm)
    url = f"/v1/vms/{vm}/vcpus/0/accesses"
    out = ok(await client.post(url, json={"gpa": 0, "size": 8192, "access": "exec"}))
    assert out["levels"]["4k"] == 2
    assert ok(await client.get(f"/v1/vms/{vm}/stats"))["nx_lpage_splits"] == 1
    rec = ok(await client.post(f"/v1/vms/{vm}/nx-huge-pages/recover", json={}))
    assert (rec["recovered"], rec["remaining"]) == (1, 0)
    assert rec["zap"]["cause"] == "nx_recovery"
    zaps = ok(await client.get(f"/v1/vms/{vm}/zaps", params={"cause": "nx_recovery"}))
    assert len(zaps["items"]) == 1


async def test_service_defaults_and_replay_after_restart(
    make_client: Callable[..., Any], settings: Settings
) -> None:
    pml = VmService(settings.database_url, run_migrations=False, host_profile={"enable_pml": True})
    client = await make_client(service=pml)
    assert ok(await client.get("/v1/capabilities"))["host"]["enable_pml"] is True
    vm = await new_vm(client)
    await thp_slot(client, vm)
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4 * MiB}))
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB, flags=["KVM_MEM_LOG_DIRTY_PAGES"]))
    url = f"/v1/vms/{vm}/vcpus/0/accesses"
    ok(await client.post(url, json={"gpa": 0, "size": MiB, "access": "write"}))
    stats = ok(await client.get(f"/v1/vms/{vm}/stats"))
    assert stats["pml_entries"] == 256 and stats["pf_fast"] == 0
    # Another service with the default profile replays the journal: the VM keeps PML.
    other = await make_client()
    assert ok(await other.get(f"/v1/vms/{vm}"))["host"]["enable_pml"] is True
    assert ok(await other.get(f"/v1/vms/{vm}/stats"))["pml_entries"] == 256


async def test_what_if_host_variants(client: httpx.AsyncClient) -> None:
    vm = await new_vm(client)
    await thp_slot(client, vm)
    ops = [
        {"op": "access", "gpa": 0, "size": 4 * MiB, "access": "write"},
        {
            "op": "set_user_memory_region",
            "slot": 0,
            "flags": 1,
            "guest_phys_addr": 0,
            "memory_size": 4 * MiB,
            "userspace_addr": HVA,
        },
        {"op": "access", "gpa": 0, "size": 2 * MiB, "access": "write"},
    ]
    variants = [{"name": "wp"}, {"name": "pml", "host": {"enable_pml": True}}]
    r = ok(await client.post(f"/v1/vms/{vm}/what-if", json={"ops": ops, "variants": variants}))
    wp, pml = r["variants"]
    assert (wp["host"]["enable_pml"], pml["host"]["enable_pml"]) == (False, True)
    assert pml["faults"] < wp["faults"]


async def test_a_vm_replays_under_the_revision_it_was_created_with(
    make_client: Callable[..., Any], client: httpx.AsyncClient, settings: Settings
) -> None:
    """New VMs journal the latest engine revision (from 2 on, a write under a write-protected
    huge leaf splits it, tdp_mmu_split_huge_page); a creation record from before revisions
    replays as revision 1 (the leaf was zapped), so old journals keep reaching that state."""
    vm = await new_vm(client, host={"eager_page_split": False})
    assert ok(await client.get(f"/v1/vms/{vm}"))["engine_rev"] == ENGINE_REV
    await thp_slot(client, vm)
    access = f"/v1/vms/{vm}/vcpus/0/accesses"
    ok(await client.post(access, json={"gpa": 0, "size": 4 * MiB, "access": "write"}))
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB, flags=["KVM_MEM_LOG_DIRTY_PAGES"]))
    ok(await client.post(access, json={"gpa": 0, "size": 4096, "access": "write"}))
    stats = ok(await client.get(f"/v1/vms/{vm}/stats"))
    assert (stats["pages_4k"], stats["pages_2m"]) == (512, 1)

    async def leaf_at(c: httpx.AsyncClient, gpa: int) -> Any:
        (root,) = ok(await c.get(f"/v1/vms/{vm}/translate", params={"gpa": gpa}))["roots"]
        return root["leaf"]

    assert (await leaf_at(client, 0x6000))["level"] == 1  # kept, read-only, by the split
    other = await make_client()  # a second service replays the journal: same revision
    assert (await leaf_at(other, 0x6000))["level"] == 1

    # The same journal under a creation record without a revision (as every VM created
    # before revisions has): revision 1, where the write zapped the 2M leaf.
    engine = create_engine(settings.database_url.replace("+aiosqlite", ""))
    with engine.begin() as conn:
        row = conn.execute(text("SELECT create_args FROM vms WHERE id = :id"), {"id": vm}).one()
        args = json.loads(row[0]) if isinstance(row[0], str) else dict(row[0])
        assert args.pop("engine_rev") == ENGINE_REV
        conn.execute(
            text("UPDATE vms SET create_args = :a WHERE id = :id"),
            {"a": json.dumps(args), "id": vm},
        )
        snaps = conn.execute(text("SELECT count(*) FROM snapshots WHERE vm_id = :id"), {"id": vm})
        assert snaps.scalar() == 0  # the journal alone rebuilds the VM
    engine.dispose()
    old = await make_client()
    assert await leaf_at(old, 0x6000) is None
    assert (await leaf_at(old, 0))["level"] == 1
