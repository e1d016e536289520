"""Memslots over HTTP: KVM_SET_USER_MEMORY_REGION2 outcomes, errnos, If-Match, dirty logging."""

from __future__ import annotations

import base64
import errno

import httpx
import pytest

from .helpers import (
    HVA,
    MiB,
    assert_errno,
    assert_problem,
    etag,
    new_vm,
    ok,
    put_slot,
    state,
)

SLOT_ZAP_ALL = 1 << 7


async def test_create_with_hex_strings_and_flag_names(client: httpx.AsyncClient, vm: str) -> None:
    r = await client.put(
        f"/v1/vms/{vm}/memslots/0x3",
        json={
            "flags": ["KVM_MEM_LOG_DIRTY_PAGES"],
            "guest_phys_addr": "0x100000",
            "memory_size": "0x200000",
            "userspace_addr": hex(HVA),
        },
    )
    body = ok(r)
    assert etag(r)
    assert body["change"] == "create"
    assert body["zap"] is None
    slot = body["memslot"]
    assert slot["slot"] == 3 and slot["id"] == 3 and slot["as_id"] == 0
    assert slot["flags"] == 1
    assert slot["guest_phys_addr"] == 0x100000
    assert slot["memory_size"] == 0x200000
    assert slot["userspace_addr"] == HVA
    assert slot["base_gfn"] == 0x100
    assert slot["npages"] == 0x200
    assert slot["guest_memfd"] == 0 and slot["guest_memfd_offset"] == 0
    assert ok(await client.get(f"/v1/vms/{vm}/memslots/3")) == slot


async def test_change_kinds_and_zap_paths(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    same = ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    assert same["change"] == "none" and same["zap"] is None
    flags = ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB, flags=1))
    assert flags["change"] == "flags_only"
    assert flags["memslot"]["flags"] == 1
    # Something mapped, so that the zap counts are not trivially zero.
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 8192}))
    moved = ok(await put_slot(client, vm, 0, gpa=4 * MiB, size=2 * MiB, flags=1))
    assert moved["change"] == "move"
    assert moved["memslot"]["guest_phys_addr"] == 4 * MiB
    assert moved["zap"]["path"] == "zap_all_fast"  # default VM, SLOT_ZAP_ALL enabled
    # With the quirk disabled, KVM zaps only the slot's leaf SPTEs.
    ok(
        await client.post(
            f"/v1/vms/{vm}/enable-cap",
            json={"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [SLOT_ZAP_ALL]},
        )
    )
    gone = ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    assert gone["change"] == "delete"
    assert gone["memslot"] is None
    assert gone["zap"]["path"] == "zap_slot_leafs"
    assert_errno(await client.get(f"/v1/vms/{vm}/memslots/0"), errno.ENOENT)


async def test_delete_through_put_with_size_zero(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 1, gpa=0, size=MiB))
    gone = ok(await put_slot(client, vm, 1, gpa=0, size=0))
    assert gone["change"] == "delete"
    assert gone["zap"]["path"]  # a delete always names its path, even with nothing mapped


async def test_list_ordered_by_slot_and_paginated(client: httpx.AsyncClient, vm: str) -> None:
    # SMM address space: slot = as_id << 16 | id.
    for i, (slot, gpa) in enumerate(((5, 0), (2, 4 * MiB), (0x10001, 0), (0, 8 * MiB))):
        ok(await put_slot(client, vm, slot, gpa=gpa, size=MiB, hva=HVA + i * 16 * MiB))
    page = ok(await client.get(f"/v1/vms/{vm}/memslots"))
    assert [m["slot"] for m in page["items"]] == [0, 2, 5, 0x10001]
    assert page["next_cursor"] is None
    smm = page["items"][-1]
    assert smm["as_id"] == 1 and smm["id"] == 1
    got: list[int] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        p = ok(await client.get(f"/v1/vms/{vm}/memslots", params=params))
        got += [m["slot"] for m in p["items"]]
        cursor = p["next_cursor"]
        if cursor is None:
            break
    assert got == [0, 2, 5, 0x10001]
    assert_problem(await client.get(f"/v1/vms/{vm}/memslots", params={"cursor": "nope"}), 422)


@pytest.mark.parametrize(
    ("slot", "kwargs", "err"),
    [
        (0, {"gpa": 0x1000 + 1, "size": MiB}, errno.EINVAL),  # gpa not page aligned
        (0, {"gpa": 0, "size": MiB + 1}, errno.EINVAL),  # size not a page multiple
        (0, {"gpa": 0, "size": MiB, "hva": HVA + 8}, errno.EINVAL),  # hva not aligned
        (0, {"gpa": 0, "size": MiB, "flags": 1 << 9}, errno.EINVAL),  # unknown flag bit
        (32764, {"gpa": 0, "size": MiB}, errno.EINVAL),  # id >= KVM_USER_MEM_SLOTS
        (0x20000, {"gpa": 0, "size": MiB}, errno.EINVAL),  # as_id 2
        (1, {"gpa": MiB // 2, "size": MiB}, errno.EEXIST),  # overlaps slot 0
        (7, {"gpa": 0, "size": 0}, errno.EINVAL),  # delete of an absent slot
        (0, {"gpa": 0, "size": 2 * MiB}, errno.EINVAL),  # resize an existing slot
        (0, {"gpa": 0, "size": MiB, "hva": HVA + MiB}, errno.EINVAL),  # move hva
        (0, {"gpa": 0, "size": MiB, "flags": ["KVM_MEM_READONLY"]}, errno.EINVAL),  # toggle RO
        (2, {"gpa": 2**64 - 4096, "size": 8192}, errno.EINVAL),  # wraps around
    ],
)
async def test_rejections_have_kvm_errno_and_change_nothing(
    client: httpx.AsyncClient, vm: str, slot: int, kwargs: dict[str, object], err: int
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    before = await state(client, vm)
    assert_errno(await put_slot(client, vm, slot, **kwargs), err)  # type: ignore[arg-type]
    assert await state(client, vm) == before


async def test_smm_slot_refused_on_td(client: httpx.AsyncClient) -> None:
    td = await new_vm(client, vm_type="KVM_X86_TDX_VM")
    assert_errno(await put_slot(client, td, 0x10000, gpa=0, size=MiB), errno.EINVAL)


@pytest.mark.parametrize(
    "body",
    [
        {"memory_size": 2**64},
        {"memory_size": -4096},
        {"flags": ["KVM_MEM_NOPE"]},
        {"flags": 2**32},
        {"guest_memfd": 2**32},
        {"guest_phys_addr": "0x"},
        {"guest_phys_addr": "12ab"},
        {"slot": 9, "memory_size": 4096},  # disagrees with the path
        {"size": 4096},  # not a field of the struct
    ],
)
async def test_malformed_region_is_422(
    client: httpx.AsyncClient, vm: str, body: dict[str, object]
) -> None:
    before = await state(client, vm)
    # Otherwise complete: the 422 is for the field under test, not a missing one.
    full = {"guest_phys_addr": 0, "memory_size": MiB, "userspace_addr": HVA} | body
    assert_problem(await client.put(f"/v1/vms/{vm}/memslots/0", json=full), 422)
    assert await state(client, vm) == before


async def test_if_match(client: httpx.AsyncClient, vm: str) -> None:
    r = await put_slot(client, vm, 0, gpa=0, size=MiB)
    v1 = etag(r)
    stale = v1
    r = await put_slot(client, vm, 1, gpa=MiB, size=MiB, hva=HVA + MiB)
    v2 = etag(r)
    assert v2 != v1
    before = await state(client, vm)
    hdr = {"If-Match": stale}
    assert_problem(
        await client.put(
            f"/v1/vms/{vm}/memslots/2",
            json={"guest_phys_addr": 4 * MiB, "memory_size": MiB, "userspace_addr": HVA + 4 * MiB},
            headers=hdr,
        ),
        412,
    )
    assert_problem(await client.delete(f"/v1/vms/{vm}/memslots/0", headers=hdr), 412)
    assert await state(client, vm) == before
    r = await client.delete(f"/v1/vms/{vm}/memslots/0", headers={"If-Match": v2})
    v3 = etag(ok(r) and r)
    assert v3 != v2
    r = await client.delete(f"/v1/vms/{vm}/memslots/1", headers={"If-Match": "*"})
    ok(r)
    # RFC 9110: If-Match compares strongly; a weak tag never matches, even the current one.
    current = etag(r)
    r = await client.post(
        f"/v1/vms/{vm}/vcpus", json={"id": 3}, headers={"If-Match": "W/" + current}
    )
    assert_problem(r, 412)
    assert etag(r) == current  # the 412 says which version to retry against
    r = await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 3}, headers={"If-Match": current})
    ok(r, 201)


async def test_dirty_log_is_destructive(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB, flags=["KVM_MEM_LOG_DIRTY_PAGES"]))
    access = {"gpa": 0, "size": 3 * 4096, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=access))
    r = await client.get(f"/v1/vms/{vm}/memslots/0/dirty-log")
    log = ok(r)
    assert log["first_page"] == 0
    assert log["num_pages"] == 256
    assert log["dirty_count"] == 3
    words = base64.b64decode(log["bitmap"])
    assert len(words) == 256 // 8
    assert int.from_bytes(words[:8], "little") == 0b111
    again = await client.get(f"/v1/vms/{vm}/memslots/0/dirty-log")
    assert ok(again)["dirty_count"] == 0
    assert etag(again) != etag(r)  # journaled: it changed the VM (write protection re-armed)


async def test_dirty_log_of_slot_without_logging_is_enoent(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    assert_errno(await client.get(f"/v1/vms/{vm}/memslots/0/dirty-log"), errno.ENOENT)


async def test_clear_dirty_log(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB, flags=1))
    bitmap = base64.b64encode((0b11).to_bytes(8, "little")).decode()
    body = {"first_page": 0, "num_pages": 64, "bitmap": bitmap}
    # KVM_CLEAR_DIRTY_LOG does not need manual protect; with nothing dirty it clears nothing.
    r = await client.post(f"/v1/vms/{vm}/memslots/0/dirty-log/clear", json=body)
    assert ok(r)["cleared"] == 0
    ok(
        await client.post(
            f"/v1/vms/{vm}/enable-cap",
            json={"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [1]},
        )
    )
    access = {"gpa": 0, "size": 2 * 4096, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=access))
    assert ok(await client.get(f"/v1/vms/{vm}/memslots/0/dirty-log"))["dirty_count"] == 2
    r = await client.post(f"/v1/vms/{vm}/memslots/0/dirty-log/clear", json=body)
    assert ok(r)["cleared"] == 2
    assert ok(await client.get(f"/v1/vms/{vm}/memslots/0/dirty-log"))["dirty_count"] == 0
    bad = body | {"bitmap": "***not base64***"}
    assert_problem(await client.post(f"/v1/vms/{vm}/memslots/0/dirty-log/clear", json=bad), 422)
