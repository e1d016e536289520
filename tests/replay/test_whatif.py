"""POST /v1/vms/{vm}/what-if: forks per variant, the VM untouched, limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from app.engine import codec
from app.services.qemu_trace import parse
from tests.replay.conftest import TRACES

MiB = 1 << 20
BOOT = (TRACES / "pc-boot-smm.trace").read_text()
HVA = 0x7F00_0000_0000


async def _vm(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/vms", json={"name": "w", **body})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _digest(client: httpx.AsyncClient, vm: str) -> str:
    service = client.app.state.service  # type: ignore[attr-defined]
    value, _ = await service.read(vm, codec.digest)
    return str(value)


async def _ram(client: httpx.AsyncClient, vm: str, size: int = 4 * MiB) -> None:
    r = await client.put(
        f"/v1/vms/{vm}/memslots/0",
        json={"guest_phys_addr": 0, "memory_size": size, "userspace_addr": HVA},
    )
    assert r.status_code == 200, r.text


async def _touch(client: httpx.AsyncClient, vm: str, size: int = 4 * MiB) -> None:
    # Through the service (journaled, locked), as any guest access is.
    service = client.app.state.service  # type: ignore[attr-defined]
    await service.mutate(vm, "access", {"vcpu": 0, "gpa": 0, "size": size, "access": "read"})


async def test_boot_trace_zap_all_refaults_all_touched_ram_and_slot_leafs_none(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(max_body_bytes=4 * MiB)
    vm = await _vm(client)
    before = await _digest(client, vm)
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={
            "trace": BOOT,
            "touch": "all_ram",
            "variants": [
                {"name": "quirk on", "disable_quirks": 0},
                {"name": "quirk off", "disable_quirks": 128},
            ],
        },
    )
    assert r.status_code == 200, r.text
    on, off = r.json()["variants"]
    calls = parse(BOOT).calls
    fast_zaps = sum(1 for c in calls if c.size == 0)  # every delete, both address spaces
    assert on["slot_zap_all"] and not off["slot_zap_all"]
    assert on["zaps_by_path"] == {"zap_all_fast": fast_zaps}
    assert off["zaps_by_path"] == {"zap_slot_leafs": fast_zaps}
    assert on["trace_mismatches"] == off["trace_mismatches"] == 0
    # Every page a fast zap took was touched RAM, and the guest faulted all of it back:
    # at least the low RAM (below the VGA hole and 1 MiB-128 MiB) on each of the zaps,
    # since the trace creates it before its first delete.
    low_ram_pages = (0xA0000 + 0x7F00000) // 4096
    assert on["refaults"] == on["sptes_zapped_total"] >= fast_zaps * low_ram_pages
    assert off["refaults"] == 0
    assert off["sptes_zapped_total"] == 0
    assert on["roots_invalidated"] == fast_zaps and off["roots_invalidated"] == 0
    assert on["final_memslots"] == off["final_memslots"]
    final = {c.slot: c for c in calls}  # each slot's last call
    assert len(on["final_memslots"]) == len([c for c in final.values() if c.size])
    assert on["audit_violations"] == off["audit_violations"] == 0
    assert on["estimate"]["model"] is True
    assert on["estimate"]["total_us"] > off["estimate"]["total_us"]
    # The VM itself never changed.
    assert await _digest(client, vm) == before
    assert (await client.get(f"/v1/vms/{vm}/memslots")).json()["items"] == []


async def test_ops_run_on_forks_and_the_vm_stays_byte_identical(
    client: httpx.AsyncClient,
) -> None:
    vm = await _vm(client)
    await _ram(client, vm)
    await _touch(client, vm)
    before = await _digest(client, vm)
    etag = (await client.get(f"/v1/vms/{vm}")).headers["ETag"]
    ops = [
        {
            "op": "set_user_memory_region",
            "slot": 1,
            "flags": 0,
            "guest_phys_addr": "0x1000000",
            "memory_size": 0x20000,
            "userspace_addr": HVA + 8 * MiB,
            "guest_memfd": 0,
            "guest_memfd_offset": 0,
        },
        {"op": "access", "gpa": "0x1000000", "size": 0x20000, "access": "write"},
        {"op": "delete_memslot", "slot": 1},
        {"op": "access", "gpa": 0, "size": 4 * MiB, "access": "read"},
    ]
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={
            "ops": ops,
            "variants": [
                {"name": "on", "disable_quirks": 0},
                {"name": "off", "disable_quirks": "0x80"},
                {
                    "name": "rejected design",
                    "disable_quirks": 128,
                    "zap_policy": "zap_all_shared_only",
                },
            ],
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == etag
    on, off, rejected = r.json()["variants"]
    assert on["ops_failed"] == off["ops_failed"] == 0 and on["ops_applied"] == 4
    assert on["refaults"] == 1024 and off["refaults"] == 0
    assert rejected["zap_policy"] == "zap_all_shared_only"
    assert on["sptes_zapped"]["direct"]["4k"] == on["sptes_zapped"]["4k"] == 1024 + 32
    assert await _digest(client, vm) == before
    assert (await client.get(f"/v1/vms/{vm}")).headers["ETag"] == etag


async def test_a_what_if_may_re_enable_the_quirk(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    service = client.app.state.service  # type: ignore[attr-defined]
    await service.mutate(
        vm, "enable_cap", {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [128, 0, 0, 0]}
    )
    await _ram(client, vm)
    ops = [{"op": "access", "gpa": 0, "size": 4 * MiB}, {"op": "delete_memslot", "slot": 0}]
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={
            "ops": ops,
            "variants": [{"name": "as is"}, {"name": "back on", "disable_quirks": 0}],
        },
    )
    assert r.status_code == 200, r.text
    as_is, back_on = r.json()["variants"]
    assert as_is["disabled_quirks"] & 128 and not as_is["slot_zap_all"]
    assert back_on["slot_zap_all"] and back_on["zaps_by_path"] == {"zap_all_fast": 1}


async def test_a_td_variant_starts_from_an_empty_vm_only(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    trace = (TRACES / "pci-bar-remap.trace").read_text()
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={"trace": trace, "variants": [{"name": "td", "vm_type": "KVM_X86_TDX_VM"}]},
    )
    assert r.status_code == 200, r.text
    (td,) = r.json()["variants"]
    assert td["vm_type_name"] == "KVM_X86_TDX_VM" and not td["slot_zap_all"]
    assert td["zaps_by_path"] == {"zap_slot_leafs": 4}
    await _ram(client, vm)
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={"trace": trace, "variants": [{"name": "td", "vm_type": 5}]},
    )
    assert r.status_code == 422 and "no memslots" in r.json()["detail"]


async def test_limits_are_422_and_a_host_without_tdp_mmu_is_eopnotsupp(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(whatif_max_variants=2, whatif_max_ops=3)
    vm = await _vm(client)
    op = {"op": "access", "gpa": 0, "size": 4096}
    variant = {"name": "v"}

    async def what_if(**body: Any) -> httpx.Response:
        return await client.post(f"/v1/vms/{vm}/what-if", json=body)

    r = await what_if(ops=[op], variants=[{"name": f"v{i}"} for i in range(3)])
    assert r.status_code == 422 and "VKMMU_WHATIF_MAX_VARIANTS" in r.json()["detail"]
    r = await what_if(ops=[op] * 4, variants=[variant])
    assert r.status_code == 422 and "VKMMU_WHATIF_MAX_OPS" in r.json()["detail"]
    r = await what_if(ops=[op], variants=[{"name": "h", "host": {"cpu": "spr"}}])
    assert r.status_code == 422  # not a host parameter vkmmu knows
    r = await what_if(ops=[op], variants=[{"name": "h", "host": {"tdp_mmu": False}}])
    assert r.status_code == 400 and r.json()["errno_name"] == "EOPNOTSUPP"
    r = await what_if(ops=[{"op": "destroy"}], variants=[variant])
    assert r.status_code == 422 and "unknown operation" in r.json()["detail"]
    r = await what_if(ops=[{"gpa": 0}], variants=[variant])
    assert r.status_code == 422
    r = await what_if(ops=[op], variants=[variant, variant])
    assert r.status_code == 422 and "unique" in r.json()["detail"]
    r = await what_if(variants=[variant])
    assert r.status_code == 422
    r = await what_if(trace="kvm_set_user_memory Slot#", variants=[variant])
    assert r.status_code == 422 and "line 1" in r.json()["detail"]
    r = await what_if(ops=[op], variants=[variant], costs={"nope": 1})
    assert r.status_code == 422
    r = await what_if(ops=[op], variants=[])
    assert r.status_code == 422
    # A failing op is counted, not an error of the request.
    r = await what_if(ops=[op, {"op": "delete_memslot", "slot": 7}], variants=[variant])
    assert r.status_code == 200
    (row,) = r.json()["variants"]
    assert row["ops_failed"] == 1 and row["first_failures"][0]["index"] == 1
    assert row["first_failures"][0]["errno_name"] == "EINVAL"
    assert (
        await client.post("/v1/vms/vm-nope/what-if", json={"ops": [op], "variants": [variant]})
    ).status_code == 404


async def test_forks_count_against_the_page_table_budget(
    make_client: Callable[..., Any],
) -> None:
    # Room for the VM's own tables (a 4 MiB touch reserves at most 7: six and a root), none
    # for a copy.
    client = await make_client(page_table_budget_bytes=7 * 4096)
    vm = await _vm(client)
    await _ram(client, vm)
    await _touch(client, vm)
    before = await _digest(client, vm)
    r = await client.post(
        f"/v1/vms/{vm}/what-if",
        json={"ops": [{"op": "delete_memslot", "slot": 0}], "variants": [{"name": "v"}]},
    )
    assert r.status_code == 507, r.text
    assert r.json()["errno_name"] == "ENOMEM"
    assert await _digest(client, vm) == before


async def test_if_match_names_the_version_to_copy(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    body = {"ops": [{"op": "access", "gpa": 0, "size": 4096}], "variants": [{"name": "v"}]}
    r = await client.post(f"/v1/vms/{vm}/what-if", json=body, headers={"If-Match": '"3"'})
    assert r.status_code == 412 and r.headers["ETag"] == '"0"'
    r = await client.post(f"/v1/vms/{vm}/what-if", json=body, headers={"If-Match": '"0"'})
    assert r.status_code == 200 and r.headers["ETag"] == '"0"'
