"""The TD lifecycle routes (KVM_TDX_INIT_VM / INIT_VCPU / INIT_MEM_REGION / FINALIZE_VM) over
HTTP, with the errno arch/x86/kvm/vmx/tdx.c gives (tdx_td_init, tdx_vcpu_create,
tdx_vcpu_ioctl, tdx_vcpu_init_mem_region, tdx_td_finalize, tdx_vcpu_pre_run) and the
persistence of the lifecycle across a restart (journal replay)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import httpx

from .helpers import MiB, assert_errno, new_vm, ok, put_slot, state

SRC = 0x5000_0000
PAGE = 4096


async def initialised_td(client: httpx.AsyncClient) -> str:
    vm = await new_vm(client, vm_type="KVM_X86_TDX_VM", vcpus=0, td_lifecycle=True)
    ok(await client.post(f"/v1/vms/{vm}/tdx/init", json={"attributes": 1 << 28}))
    ok(await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 0}), 201)
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/tdx/init", json={}))
    fd = ok(await client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 2 * MiB}), 201)["fd"]
    r = await put_slot(
        client,
        vm,
        0,
        gpa=0,
        size=2 * MiB,
        flags=["KVM_MEM_GUEST_MEMFD"],
        guest_memfd=fd,
        guest_memfd_offset=0,
    )
    ok(r)
    url = f"/v1/vms/{vm}/memory-attributes"
    ok(await client.post(url, json={"address": 0, "size": 2 * MiB, "attributes": 8}))
    return vm


async def test_the_lifecycle_over_http(client: httpx.AsyncClient) -> None:
    vm = await initialised_td(client)
    ok(
        await client.post(
            "/v1/vms/" + vm + "/host-memory/write", json={"userspace_addr": SRC, "data": "5eed"}
        )
    )
    # KVM_RUN before finalize: EINVAL (tdx_vcpu_pre_run); nothing changes.
    before = await state(client, vm)
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0})
    assert_errno(r, errno.EINVAL)
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/pre-fault", json={"gpa": 0, "size": PAGE})
    assert_errno(r, errno.EOPNOTSUPP)
    assert await state(client, vm) == before
    body = {"source_addr": SRC, "gpa": 0, "nr_pages": 2, "flags": 1}
    out = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/tdx/init-mem-region", json=body))
    assert out == {"source_addr": SRC + 2 * PAGE, "gpa": 2 * PAGE, "nr_pages": 0}
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/tdx/init-mem-region", json=body)
    assert_errno(r, errno.EEXIST)
    fin = ok(await client.post(f"/v1/vms/{vm}/tdx/finalize"))
    assert fin["td_state"] == "runnable"
    assert (fin["ops"]["TDH.MEM.PAGE.ADD"], fin["ops"]["TDH.MR.EXTEND"]) == (2, 32)
    got = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 0, "len": 2}))
    assert got["data"] == "5eed"
    tdx = ok(await client.get(f"/v1/vms/{vm}/tdx"))
    assert tdx["lifecycle"]["td_state"] == "runnable" and tdx["accepted_pages"] == 2
    assert_errno(await client.post(f"/v1/vms/{vm}/tdx/finalize"), errno.EINVAL)
    assert_errno(await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 1}), errno.EIO)


async def test_lifecycle_errnos_over_http(client: httpx.AsyncClient) -> None:
    plain = await new_vm(client)
    assert_errno(
        await client.post(f"/v1/vms/{plain}/tdx/init", json={"attributes": 0}), errno.ENOTTY
    )
    r = await client.post("/v1/vms", json={"vm_type": 5, "vcpus": 1, "td_lifecycle": True})
    assert_errno(r, errno.EIO)
    vm = await new_vm(client, vm_type=5, vcpus=0, td_lifecycle=True)
    assert_errno(await client.post(f"/v1/vms/{vm}/vcpus/0/tdx/init", json={}), errno.EINVAL)
    assert_errno(await client.post(f"/v1/vms/{vm}/tdx/finalize"), errno.EINVAL)
    assert_errno(await client.post(f"/v1/vms/{vm}/tdx/init", json={"attributes": 1}), errno.EINVAL)
    r = await client.post(f"/v1/vms/{vm}/tdx/init", json={"attributes": 0, "gpaw": 52})
    assert_errno(r, errno.EINVAL)
    ok(await client.post(f"/v1/vms/{vm}/tdx/init", json={"attributes": 0, "gpaw": 48}))
    assert_errno(await client.post(f"/v1/vms/{vm}/tdx/init", json={"attributes": 0}), errno.EINVAL)
    ok(await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 0}), 201)
    r = await client.post(
        f"/v1/vms/{vm}/vcpus/0/tdx/init-mem-region",
        json={"source_addr": SRC, "gpa": 0, "nr_pages": 1},
    )
    assert_errno(r, errno.EINVAL)  # the vCPU is not initialised


async def test_a_lifecycle_td_survives_a_restart(
    make_client: Callable[..., Any], client: httpx.AsyncClient
) -> None:
    vm = await initialised_td(client)
    body = {"source_addr": SRC, "gpa": 0, "nr_pages": 1}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/tdx/init-mem-region", json=body))
    before = ok(await client.get(f"/v1/vms/{vm}/tdx"))
    other = await make_client()  # a second service on the same database replays the journal
    after = ok(await other.get(f"/v1/vms/{vm}/tdx"))
    assert after["lifecycle"] == before["lifecycle"]
    assert after["lifecycle"]["td_state"] == "initialized"
    ok(await other.post(f"/v1/vms/{vm}/tdx/finalize"))


async def test_map_gpa_over_http(client: httpx.AsyncClient) -> None:
    """tdx_map_gpa / tdx_complete_vmcall_map_gpa through the routes: a TD runnable at
    creation, MapGPA refused until KVM_CAP_EXIT_HYPERCALL, then one exit per 2 MiB."""
    vm = await new_vm(client, vm_type=5)
    url = f"/v1/vms/{vm}/vcpus/0/tdvmcall/map-gpa"
    out = ok(await client.post(url, json={"gpa": 0, "size": 4 * MiB}))
    assert out["status"] == "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED" and out["exit"] is None
    cap = {"cap": "KVM_CAP_EXIT_HYPERCALL", "flags": 0, "args": [1 << 12]}
    caps = ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap))
    assert caps["hypercall_exit_enabled"] == 1 << 12
    out = ok(await client.post(url, json={"gpa": 1, "size": 4096}))
    assert (out["status"], out["r11"]) == ("TDVMCALL_STATUS_ALIGN_ERROR", 1)
    out = ok(await client.post(url, json={"gpa": 0, "size": 3 * MiB}))
    assert out["exit"]["args"] == [0, 512, 16]
    assert ok(await client.get(f"/v1/vms/{vm}/tdx"))["map_gpa_pending"] == [
        {"vcpu": 0, "next_gpa": 0, "end_gpa": 3 * MiB}
    ]
    done = f"/v1/vms/{vm}/vcpus/0/hypercall/complete"
    out = ok(await client.post(done, json={"ret": 0}))
    assert out["exit"]["args"] == [2 * MiB, 256, 16]
    out = ok(await client.post(done, json={}))
    assert out["status"] == "TDVMCALL_STATUS_SUCCESS"
    assert_errno(await client.post(done, json={}), errno.EINVAL)


async def test_vmcall_map_gpa_range_over_http(client: httpx.AsyncClient) -> None:
    """____kvm_emulate_hypercall / complete_hypercall_exit through the routes, for a
    KVM_X86_SW_PROTECTED_VM: -KVM_ENOSYS in RAX until KVM_CAP_EXIT_HYPERCALL, then one exit
    with the guest's arguments, completed with run->hypercall.ret."""
    vm = await new_vm(client, vm_type="KVM_X86_SW_PROTECTED_VM")
    url = f"/v1/vms/{vm}/vcpus/0/hypercall"
    call = {"nr": 12, "a0": 2 * MiB, "a1": 512, "a2": 16}
    out = ok(await client.post(url, json=call))
    assert (out["rax"], out["exit"]) == ((1 << 64) - 1000, None)
    cap = {"cap": "KVM_CAP_EXIT_HYPERCALL", "flags": 0, "args": [1 << 12]}
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap))
    out = ok(await client.post(url, json=call | {"a0": 2 * MiB + 1}))
    assert out["rax"] == (1 << 64) - 22 and out["exit"] is None
    out = ok(await client.post(url, json=call))
    assert out["exit"]["args"] == [2 * MiB, 512, 16] and out["rax"] is None
    assert_errno(await client.post(url, json=call), errno.EINVAL)  # still in the exit
    assert (await client.post(url, json=call | {"cpl": 4})).status_code == 422
    # The VMM converts, then re-enters with ret 0.
    body = {"address": 2 * MiB, "size": 2 * MiB, "attributes": 8}
    ok(await client.post(f"/v1/vms/{vm}/memory-attributes", json=body))
    done = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/hypercall/complete", json={"ret": 0}))
    assert done["rax"] == 0 and done["exit"] is None and done["status"] is None
