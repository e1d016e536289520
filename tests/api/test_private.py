"""Private memory over HTTP: guest_memfd, memory attributes, TDX, the zap-policy experiment."""

from __future__ import annotations

import errno

import httpx
import pytest

from .helpers import HVA, MiB, assert_errno, assert_problem, new_vm, ok, put_slot, state

PRIVATE = "KVM_MEMORY_ATTRIBUTE_PRIVATE"


async def gmem(client: httpx.AsyncClient, vm: str, size: int = 4 * MiB, flags: object = 0) -> int:
    r = await client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": size, "flags": flags})
    return int(ok(r, 201)["fd"])


async def private_gmem_slot(client: httpx.AsyncClient, vm: str) -> int:
    """A 4 MiB guest_memfd bound to slot 0 at GPA 0, all of it PRIVATE; returns the fd."""
    fd = await gmem(client, vm)
    await gmem_slot(client, vm, fd)
    url = f"/v1/vms/{vm}/memory-attributes"
    ok(await client.post(url, json={"address": 0, "size": 4 * MiB, "attributes": [PRIVATE]}))
    return fd


async def gmem_slot(
    client: httpx.AsyncClient, vm: str, fd: int, *, slot: int = 0, gpa: int = 0, size: int = 4 * MiB
) -> dict[str, object]:
    r = await put_slot(
        client,
        vm,
        slot,
        gpa=gpa,
        size=size,
        flags=["KVM_MEM_GUEST_MEMFD"],
        guest_memfd=fd,
        guest_memfd_offset=0,
    )
    return ok(r)  # type: ignore[no-any-return]


@pytest.fixture
async def swp(client: httpx.AsyncClient) -> str:
    return await new_vm(client, vm_type="KVM_X86_SW_PROTECTED_VM")


@pytest.fixture
async def td(client: httpx.AsyncClient) -> str:
    return await new_vm(client, vm_type="KVM_X86_TDX_VM")


async def test_guest_memfd_create_list_and_flags(client: httpx.AsyncClient, swp: str) -> None:
    fd = await gmem(client, swp, flags=["GUEST_MEMFD_FLAG_MMAP"])
    files = ok(await client.get(f"/v1/vms/{swp}/guest-memfds"))["items"]
    assert [f["fd"] for f in files] == [fd]
    assert files[0]["flags"] == 1
    assert files[0]["size"] == 4 * MiB
    before = await state(client, swp)
    for body, err in (
        ({"size": 4096 + 1}, errno.EINVAL),
        ({"size": 0}, errno.EINVAL),
        ({"size": 4096, "flags": 1 << 8}, errno.EINVAL),
        # INIT_SHARED: only where attributes cannot make guest_memfd memory private.
        ({"size": 4096, "flags": ["GUEST_MEMFD_FLAG_INIT_SHARED"]}, errno.EINVAL),
    ):
        assert_errno(await client.post(f"/v1/vms/{swp}/guest-memfds", json=body), err)
    assert_problem(
        await client.post(f"/v1/vms/{swp}/guest-memfds", json={"size": 4096, "flags": ["X"]}),
        422,
    )
    assert await state(client, swp) == before


async def test_fallocate_rules(client: httpx.AsyncClient, swp: str) -> None:
    fd = await gmem(client, swp)
    url = f"/v1/vms/{swp}/guest-memfds/{fd}/fallocate"
    alloc = ok(await client.post(url, json={"mode": "allocate", "offset": 0, "len": 8192}))
    assert alloc["allocated"] == 2
    punched = ok(await client.post(url, json={"mode": "punch_hole", "offset": 0, "len": 4096}))
    assert punched["freed"] == 1
    before = await state(client, swp)
    # Raw mode bits: PUNCH_HOLE without KEEP_SIZE, and a mode guest_memfd does not support.
    assert_errno(
        await client.post(url, json={"mode": 2, "offset": 0, "len": 4096}), errno.EOPNOTSUPP
    )
    assert_errno(
        await client.post(url, json={"mode": "0x11", "offset": 0, "len": 4096}), errno.EOPNOTSUPP
    )
    assert_errno(
        await client.post(url, json={"mode": "allocate", "offset": 1, "len": 4096}), errno.EINVAL
    )
    assert_errno(
        await client.post(url, json={"mode": "allocate", "offset": 0, "len": 8 * MiB}),
        errno.EINVAL,
    )
    assert_problem(await client.post(url, json={"mode": "shrink", "offset": 0, "len": 1}), 422)
    assert await state(client, swp) == before
    # An fd that is not open.
    assert_errno(
        await client.post(
            f"/v1/vms/{swp}/guest-memfds/77/fallocate",
            json={"mode": "allocate", "offset": 0, "len": 4096},
        ),
        errno.EBADF,
    )


async def test_close_then_ebadf(client: httpx.AsyncClient, swp: str) -> None:
    fd = await gmem(client, swp)
    ok(await client.delete(f"/v1/vms/{swp}/guest-memfds/{fd}"))
    assert_errno(await client.delete(f"/v1/vms/{swp}/guest-memfds/{fd}"), errno.EBADF)
    r = await put_slot(
        client, swp, 0, gpa=0, size=MiB, flags=["KVM_MEM_GUEST_MEMFD"], guest_memfd=fd
    )
    assert_errno(r, errno.EBADF)


async def test_binding_overlap_is_eexist(client: httpx.AsyncClient, swp: str) -> None:
    fd = await gmem(client, swp)
    await gmem_slot(client, swp, fd, slot=0, gpa=0, size=2 * MiB)
    before = await state(client, swp)
    r = await put_slot(
        client,
        swp,
        1,
        gpa=8 * MiB,
        size=2 * MiB,
        hva=HVA + 8 * MiB,
        flags=["KVM_MEM_GUEST_MEMFD"],
        guest_memfd=fd,
        guest_memfd_offset=MiB,
    )
    assert_errno(r, errno.EEXIST)
    assert await state(client, swp) == before


async def test_gmem_read_write(client: httpx.AsyncClient, vm: str) -> None:
    swp = vm  # a default VM: INIT_SHARED is supported there
    fd = await gmem(client, swp, flags=["GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED"])
    base = f"/v1/vms/{swp}/guest-memfds/{fd}"
    ok(await client.post(f"{base}/write", json={"offset": 8, "data": "0102"}))
    got = ok(await client.post(f"{base}/read", json={"offset": 8, "len": 2}))
    assert got == {"data": "0102"}
    assert_errno(
        await client.post(f"{base}/read", json={"offset": 4 * MiB, "len": 1}), errno.EINVAL
    )
    plain = await gmem(client, swp)
    r = await client.post(f"/v1/vms/{swp}/guest-memfds/{plain}/read", json={"offset": 0, "len": 1})
    assert_errno(r, errno.ENODEV)


async def test_memory_attributes(client: httpx.AsyncClient, swp: str) -> None:
    url = f"/v1/vms/{swp}/memory-attributes"
    body = {"address": "0x200000", "size": 2 * MiB, "attributes": [PRIVATE]}
    res = ok(await client.post(url, json=body))
    assert res["zap"] is None  # nothing mapped
    ok(await client.post(url, json={"address": 16 * MiB, "size": 4096, "attributes": 8}))
    ranges = ok(await client.get(url))["items"]
    assert ranges == [
        {"address": 2 * MiB, "size": 2 * MiB, "attributes": 8},
        {"address": 16 * MiB, "size": 4096, "attributes": 8},
    ]
    page = ok(await client.get(url, params={"limit": 1}))
    assert len(page["items"]) == 1
    rest = ok(await client.get(url, params={"cursor": page["next_cursor"]}))
    assert rest["items"] == ranges[1:]
    before = await state(client, swp)
    for bad in (
        {"address": 0, "size": 4096, "attributes": 8, "flags": 1},
        {"address": 1, "size": 4096, "attributes": 8},
        {"address": 0, "size": 0, "attributes": 8},
        {"address": 0, "size": 4096, "attributes": 1},
        {"address": 2**64 - 4096, "size": 8192, "attributes": 8},
    ):
        assert_errno(await client.post(url, json=bad), errno.EINVAL)
    assert await state(client, swp) == before


async def test_attributes_refused_without_private_memory(
    client: httpx.AsyncClient, vm: str
) -> None:
    r = await client.post(
        f"/v1/vms/{vm}/memory-attributes", json={"address": 0, "size": 4096, "attributes": 8}
    )
    assert_errno(r, errno.EINVAL)


async def test_private_fault_and_conversion(client: httpx.AsyncClient, swp: str) -> None:
    await private_gmem_slot(client, swp)
    res = ok(await client.post(f"/v1/vms/{swp}/vcpus/0/accesses", json={"gpa": 0, "size": 8192}))
    assert res["mapped"] == 2
    assert ok(await client.get(f"/v1/vms/{swp}/memslots/0"))["mapped"]["private"] == 2
    # Private → shared zaps the private mappings.
    url = f"/v1/vms/{swp}/memory-attributes"
    conv = ok(await client.post(url, json={"address": 0, "size": 4 * MiB, "attributes": 0}))
    assert conv["zap"]["cause"] == "attributes"
    assert conv["zap"]["sptes_zapped_total"] == 2
    assert ok(await client.get(f"/v1/vms/{swp}/memslots/0"))["mapped"]["private"] == 0


async def test_td_private_access_to_shared_gpa_exits_memory_fault(
    client: httpx.AsyncClient, td: str
) -> None:
    fd = await gmem(client, td)
    await gmem_slot(client, td, fd)
    # GPA 0 has the shared bit clear (a private access) but its attributes say shared: the
    # guest's outcome is an exit, which is HTTP 200.
    res = ok(await client.post(f"/v1/vms/{td}/vcpus/0/accesses", json={"gpa": 0}))
    assert res["exit"]["reason"] == "KVM_EXIT_MEMORY_FAULT"
    assert res["exit"]["flags"] == 8  # KVM_MEMORY_EXIT_FLAG_PRIVATE
    loaded = ok(await client.post(f"/v1/vms/{td}/vcpus/0/load", json={"gpa": 0, "len": 8}))
    assert loaded["exit"]["reason"] == "KVM_EXIT_MEMORY_FAULT"


async def test_td_zap_all_private_is_eperm(client: httpx.AsyncClient, td: str) -> None:
    before = await state(client, td)
    for roots in ("private", "both"):
        r = await client.post(f"/v1/vms/{td}/zaps", json={"scope": "all", "roots": roots})
        assert_errno(r, errno.EPERM)
    assert await state(client, td) == before
    ok(await client.post(f"/v1/vms/{td}/zaps", json={"scope": "all", "roots": "shared"}))


async def test_td_accept_and_slot_delete_keeps_mirror_root(
    client: httpx.AsyncClient, td: str
) -> None:
    await private_gmem_slot(client, td)
    acc = ok(await client.post(f"/v1/vms/{td}/vcpus/0/accept", json={"gpa": 0, "size": 8192}))
    assert acc["accepted"] == 2
    roles = {r["role"] for r in ok(await client.get(f"/v1/vms/{td}/roots"))["items"]}
    assert "mirror" in roles
    gone = ok(await client.delete(f"/v1/vms/{td}/memslots/0"))
    assert gone["zap"]["path"] == "zap_slot_leafs"
    roots = ok(await client.get(f"/v1/vms/{td}/roots"))["items"]
    assert any(r["role"] == "mirror" and r["valid"] for r in roots)
    assert ok(await client.get(f"/v1/vms/{td}/audit"))["ok"] is True


async def _delete_then_punch(client: httpx.AsyncClient, vm: str) -> dict[str, object]:
    fd = await private_gmem_slot(client, vm)
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accept", json={"gpa": 0, "size": 8192}))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    ok(
        await client.post(
            f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate",
            json={"mode": "punch_hole", "offset": 0, "len": 4 * MiB},
        )
    )
    return ok(await client.get(f"/v1/vms/{vm}/audit"))  # type: ignore[no-any-return]


async def test_zap_policy_experiment_shows_use_after_free(client: httpx.AsyncClient) -> None:
    real = await new_vm(client, vm_type="KVM_X86_TDX_VM")
    assert (await _delete_then_punch(client, real))["ok"] is True

    exp = await new_vm(client, vm_type="KVM_X86_TDX_VM")
    ok(await client.post(f"/v1/vms/{exp}/zap-policy", json={"policy": "zap_all_shared_only"}))
    audit = await _delete_then_punch(client, exp)
    assert audit["ok"] is False
    assert audit["violations"]
    assert_problem(await client.post(f"/v1/vms/{exp}/zap-policy", json={"policy": "x"}), 422)


async def test_service_limit_is_enomem_507(client: httpx.AsyncClient, swp: str) -> None:
    # A guest_memfd larger than the simulator's pfn space: a limit of the service, not of KVM.
    before = await state(client, swp)
    body = assert_errno(
        await client.post(f"/v1/vms/{swp}/guest-memfds", json={"size": "0x4000000000000000"}),
        errno.ENOMEM,
    )
    assert body["status"] == 507
    assert await state(client, swp) == before


async def test_tdx_state(client: httpx.AsyncClient, td: str, vm: str) -> None:
    await private_gmem_slot(client, td)
    acc = ok(await client.post(f"/v1/vms/{td}/vcpus/0/accept", json={"gpa": 0, "size": 4096}))
    assert acc == {"accepted": 1, "reaccepted": 0, "exit": None}
    tdx = ok(await client.get(f"/v1/vms/{td}/tdx"))
    # The missing page was AUGmented, then accepted once; nothing was removed.
    assert tdx["ops"]["TDH.MEM.PAGE.AUG"] == 1
    assert tdx["ops"]["TDG.MEM.PAGE.ACCEPT"] == 1
    assert tdx["ops"]["TDH.MEM.PAGE.REMOVE"] == 0
    assert tdx["accepted_pages"] == 1
    assert tdx["pending_reaccept_pages"] == 0
    assert_errno(await client.get(f"/v1/vms/{vm}/tdx"), errno.EINVAL)


async def test_roots_are_a_paginated_list_by_id(client: httpx.AsyncClient, td: str) -> None:
    fd = await gmem(client, td)
    await gmem_slot(client, td, fd)
    ok(
        await client.post(
            f"/v1/vms/{td}/memory-attributes",
            json={"address": 0, "size": 2 * MiB, "attributes": [PRIVATE]},
        )
    )
    ok(await client.post(f"/v1/vms/{td}/vcpus/0/accept", json={"gpa": 0, "size": 4096}))
    # A shared page, by its alias (GPA bit 47 set on a 4-level TD): the direct root.
    shared = {"gpa": (1 << 47) | 2 * MiB, "private": False}
    ok(await client.post(f"/v1/vms/{td}/vcpus/0/accesses", json=shared))
    full = ok(await client.get(f"/v1/vms/{td}/roots"))
    assert set(full) == {"items", "next_cursor"} and full["next_cursor"] is None
    ids = [r["id"] for r in full["items"]]
    assert len(ids) == 2 and ids == sorted(ids)
    assert {r["role"] for r in full["items"]} == {"direct", "mirror"}
    first = ok(await client.get(f"/v1/vms/{td}/roots", params={"limit": 1}))
    assert [r["id"] for r in first["items"]] == ids[:1] and first["next_cursor"] == str(ids[0])
    rest = ok(
        await client.get(f"/v1/vms/{td}/roots", params={"limit": 1, "cursor": first["next_cursor"]})
    )
    assert [r["id"] for r in rest["items"]] == ids[1:] and rest["next_cursor"] is None
