"""What the guest and the VMM do to memory: accesses, loads, stores, pre-fault, host memory."""

from __future__ import annotations

import errno

import httpx
import pytest

from .helpers import HVA, MiB, assert_errno, assert_problem, etag, ok, put_slot, state


@pytest.fixture
async def slot0(client: httpx.AsyncClient, vm: str) -> str:
    """A 4 MiB slot at GPA 1 MiB backed by HVA."""
    ok(await put_slot(client, vm, 0, gpa=MiB, size=4 * MiB))
    return vm


async def test_accesses_map_pages(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    body = {"gpa": "0x100000", "size": 4 * 4096, "access": "write"}
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=body)
    res = ok(r)
    assert etag(r)
    assert res["pages"] == 4
    assert res["mapped"] == 4
    assert res["spurious"] == 0
    assert res["refaults"] == 0
    assert res["levels"]["4k"] == 4
    assert res["exit"] is None
    again = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=body))
    assert again["mapped"] == 0
    assert again["spurious"] == 4


async def test_access_without_slot_exits_mmio(client: httpx.AsyncClient, slot0: str) -> None:
    res = ok(await client.post(f"/v1/vms/{slot0}/vcpus/0/accesses", json={"gpa": 64 * MiB}))
    # A read of the first bytes at the GPA, no page mapped on the way.
    assert res["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": 64 * MiB, "len": 8, "is_write": False}
    assert res["pages"] == 0
    assert res["mapped"] == 0


async def test_access_rejections(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    before = await state(client, vm)
    # vCPU 9 does not exist.
    assert_errno(
        await client.post(f"/v1/vms/{vm}/vcpus/9/accesses", json={"gpa": MiB}), errno.ENOENT
    )
    assert_problem(
        await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": MiB, "access": "rw"}),
        422,
    )
    assert_problem(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={}), 422)
    # A private access on a VM without private memory.
    assert_errno(
        await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": MiB, "private": True}),
        errno.EINVAL,
    )
    assert await state(client, vm) == before


async def test_store_then_load_sees_the_bytes(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    stored = await client.post(
        f"/v1/vms/{vm}/vcpus/0/store", json={"gpa": MiB + 16, "data": "0xDEADbeef"}
    )
    assert ok(stored) == {"exit": None}
    loaded = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": MiB + 16, "len": 4}))
    assert loaded == {"data": "deadbeef", "exit": None}
    # The VMM sees the same bytes at the slot's HVA.
    host = ok(
        await client.post(
            f"/v1/vms/{vm}/host-memory/read", json={"userspace_addr": HVA + 16, "len": 4}
        )
    )
    assert host["data"] == "deadbeef"


async def test_load_store_exits(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    res = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 64 * MiB, "len": 8}))
    assert res == {
        "data": None,
        "exit": {"reason": "KVM_EXIT_MMIO", "gpa": 64 * MiB, "len": 8, "is_write": False},
    }
    ok(
        await put_slot(
            client, vm, 1, gpa=16 * MiB, size=MiB, hva=HVA + 16 * MiB, flags=["KVM_MEM_READONLY"]
        )
    )
    res = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/store", json={"gpa": 16 * MiB, "data": "01"}))
    assert res["exit"]["reason"] == "KVM_EXIT_MMIO"
    assert res["exit"]["is_write"] is True


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("load", {"gpa": 1 << 20, "len": 0}),
        ("load", {"gpa": 1 << 20, "len": 4097}),
        ("store", {"gpa": 1 << 20, "data": ""}),
        ("store", {"gpa": 1 << 20, "data": "00" * 4097}),
    ],
)
async def test_load_store_length_rules_are_einval(
    client: httpx.AsyncClient, slot0: str, path: str, body: dict[str, object]
) -> None:
    before = await state(client, slot0)
    assert_errno(await client.post(f"/v1/vms/{slot0}/vcpus/0/{path}", json=body), errno.EINVAL)
    assert await state(client, slot0) == before


async def test_store_bad_hex_is_422(client: httpx.AsyncClient, slot0: str) -> None:
    for data in ("abc", "zz", 12):
        r = await client.post(f"/v1/vms/{slot0}/vcpus/0/store", json={"gpa": MiB, "data": data})
        assert_problem(r, 422)


async def test_pre_fault(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    res = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/pre-fault", json={"gpa": MiB, "size": 8192}))
    assert res == {"gpa": MiB + 8192, "size": 0}
    # A range running past the slot: progress, then what is left.
    res = ok(
        await client.post(
            f"/v1/vms/{vm}/vcpus/0/pre-fault", json={"gpa": 5 * MiB - 4096, "size": 8192}
        )
    )
    assert res == {"gpa": 5 * MiB, "size": 4096}
    # Nothing can be done at all: the errno.
    assert_errno(
        await client.post(f"/v1/vms/{vm}/vcpus/0/pre-fault", json={"gpa": 64 * MiB, "size": 4096}),
        errno.ENOENT,
    )
    assert_errno(
        await client.post(
            f"/v1/vms/{vm}/vcpus/0/pre-fault", json={"gpa": MiB, "size": 4096, "flags": 1}
        ),
        errno.EINVAL,
    )


async def test_accept_only_in_a_td(client: httpx.AsyncClient, slot0: str) -> None:
    assert_errno(
        await client.post(f"/v1/vms/{slot0}/vcpus/0/accept", json={"gpa": MiB, "size": 4096}),
        errno.EINVAL,
    )


async def test_host_memory(client: httpx.AsyncClient, slot0: str) -> None:
    vm = slot0
    w = ok(
        await client.post(
            f"/v1/vms/{vm}/host-memory/write", json={"userspace_addr": HVA, "data": "cafe"}
        )
    )
    assert w["written"] == 2
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": MiB}))
    loaded = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": MiB, "len": 2}))
    assert loaded["data"] == "cafe"
    d = ok(
        await client.post(
            f"/v1/vms/{vm}/host-memory/discard", json={"userspace_addr": HVA, "len": 4096}
        )
    )
    assert d["zap"]["cause"] == "mmu_notifier"
    # The page was freed: the guest reads zeros now.
    loaded = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": MiB, "len": 2}))
    assert loaded["data"] == "0000"
    assert_errno(
        await client.post(
            f"/v1/vms/{vm}/host-memory/read", json={"userspace_addr": HVA, "len": 2 * MiB}
        ),
        errno.E2BIG,
    )


async def test_host_page_size_bounds_the_level(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    ok(
        await client.post(
            f"/v1/vms/{vm}/host-memory/advise",
            json={"userspace_addr": HVA, "len": 4 * MiB, "advice": "hugepage"},
        )
    )
    res = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0}))
    assert res["levels"]["2m"] == 1
    ok(
        await client.post(
            f"/v1/vms/{vm}/host-memory/map",
            json={"userspace_addr": HVA + 2 * MiB, "len": 2 * MiB, "page_size": 2097152},
        )
    )
    assert_problem(
        await client.post(
            f"/v1/vms/{vm}/host-memory/map",
            json={"userspace_addr": HVA, "len": 2 * MiB, "page_size": 8192},
        ),
        422,
    )
    assert_errno(
        await client.post(
            f"/v1/vms/{vm}/host-memory/advise",
            json={"userspace_addr": HVA + 1, "len": 4096, "advice": "nohugepage"},
        ),
        errno.EINVAL,
    )


async def test_refaults_after_delete_and_recreate(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 16384}))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    res = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 16384}))
    assert res["mapped"] == 4
    assert res["refaults"] == 4
    assert ok(await client.get(f"/v1/vms/{vm}/stats"))["refaults"] == 4


async def test_exec_without_a_memslot_is_an_internal_error_exit(
    client: httpx.AsyncClient, slot0: str
) -> None:
    """handle_emulation_failure (CPL 0): KVM_EXIT_INTERNAL_ERROR, never KVM_EXIT_MMIO."""
    url = f"/v1/vms/{slot0}/vcpus/0/accesses"
    out = ok(await client.post(url, json={"gpa": 64 * MiB, "access": "exec"}))
    assert out["exit"] == {
        "reason": "KVM_EXIT_INTERNAL_ERROR",
        "suberror": 1,
        "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
    }
