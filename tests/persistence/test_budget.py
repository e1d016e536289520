"""Every byte a client can make the service hold is reserved before it is allocated: dirty
bitmaps, host-memory contents, page tables, zap events; per VM and for the whole service,
with no overshoot from calls running at once; reloads counted; a documented guest_memfd
size limit. A refused call changes nothing and leaves no record."""

from __future__ import annotations

import asyncio
import errno

import pytest

from app.engine.errors import KvmError
from app.services import budget
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory
from tests.persistence.engine_workload import HVA, MIB
from tests.persistence.test_service import journal

GIB = 1 << 30
TIB = 1 << 40
SLOT_HVA = 1 << 44  # room for a 4 TiB slot below the 47-bit user address space


async def _vm(svc: VmService, vm_type: int = 0) -> str:
    info, _ = await svc.create_vm(name=None, vm_type=vm_type)
    return str(info["id"])


def _slot(size: int, flags: int = 0) -> dict[str, int]:
    return {
        "slot": 0,
        "flags": flags,
        "guest_phys_addr": 0,
        "memory_size": size,
        "userspace_addr": SLOT_HVA,
    }


async def test_dirty_bitmap_of_a_huge_slot_is_refused_before_allocating(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, snapshot_every=0, vm_memory_budget_bytes=64 * MIB)
    vm = await _vm(svc)
    with pytest.raises(KvmError) as e:  # 4 TiB with dirty logging: a 1 GiB bitmap
        await svc.mutate(vm, "set_user_memory_region", _slot(4 * TIB, flags=1))
    assert e.value.errno == errno.ENOMEM
    assert await journal(svc, vm) == []
    assert svc.ledger.of(vm) < 64 * MIB
    await svc.mutate(vm, "set_user_memory_region", _slot(4 * TIB))  # no bitmap: fine
    with pytest.raises(KvmError) as e:  # turning logging on later costs the same
        await svc.mutate(vm, "set_user_memory_region", _slot(4 * TIB, flags=1))
    assert e.value.errno == errno.ENOMEM
    assert [r.op for r in await journal(svc, vm)] == ["set_user_memory_region"]


async def test_host_contents_have_a_quota(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, snapshot_every=0, vm_memory_budget_bytes=1 * MIB)
    vm = await _vm(svc)
    await svc.mutate(vm, "host_write", {"userspace_addr": HVA, "data": "ab" * 4096})
    held = svc.ledger.of(vm)
    assert held >= 4096
    with pytest.raises(KvmError) as e:
        await svc.mutate(vm, "host_write", {"userspace_addr": HVA, "data": "cd" * 600_000})
    assert e.value.errno == errno.ENOMEM
    assert svc.ledger.of(vm) == held


async def test_concurrent_calls_never_pass_the_service_budget(
    db_url: str, make_service: ServiceFactory
) -> None:
    per_call = 256 * 1024
    svc = await make_service(db_url, snapshot_every=0, memory_budget_bytes=3 * per_call)
    vms = [await _vm(svc) for _ in range(8)]
    data = "ee" * (per_call // 2 - 6 * 4096)  # its reservation is just under `per_call`

    async def write(vm: str) -> bool:
        try:
            await svc.mutate(vm, "host_write", {"userspace_addr": HVA, "data": data})
        except KvmError as e:
            assert e.errno == errno.ENOMEM
            return False
        return True

    ok = await asyncio.gather(*(write(vm) for vm in vms))
    # Each call reserves ~232 KiB (hex text: two characters a byte, plus rounding and zap
    # events) and keeps 104 KiB: six fit in 768 KiB one after another, never all eight.
    assert 1 <= sum(ok) < len(vms)
    held = [h for h, _ in await asyncio.gather(*(svc.read(vm, budget.bytes_held) for vm in vms))]
    assert sum(held) <= svc.ledger.service_bytes
    assert svc.ledger.total() <= svc.ledger.service_bytes


async def test_reloads_are_counted(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, snapshot_every=0)
    vm = await _vm(svc)
    await svc.mutate(vm, "set_user_memory_region", _slot(64 * MIB))
    await svc.mutate(vm, "access", {"vcpu": 0, "gpa": 0, "size": 16 * MIB, "access": "write"})
    before = svc.ledger.of(vm)
    assert before >= 8 * 4096  # page tables
    assert svc.evict(vm) and svc.ledger.of(vm) == 0
    held, _ = await svc.read(vm, budget.bytes_held)  # reloaded from the journal
    assert svc.ledger.of(vm) == held == before


async def test_guest_memfd_size_limit(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, snapshot_every=0)
    vm = await _vm(svc, vm_type=1)  # KVM_X86_SW_PROTECTED_VM
    with pytest.raises(KvmError) as e:
        await svc.mutate(vm, "create_guest_memfd", {"size": 1 << 51, "flags": 0})
    assert e.value.errno == errno.ENOMEM and "VKMMU_MAX_GUEST_MEMFD_BYTES" in e.value.detail
    with pytest.raises(KvmError) as e:  # the kernel's own checks keep their errno
        await svc.mutate(vm, "create_guest_memfd", {"size": (1 << 51) + 1, "flags": 0})
    assert e.value.errno == errno.EINVAL
    await svc.mutate(vm, "create_guest_memfd", {"size": GIB, "flags": 0})
