"""Every byte a client can make the service hold is reserved before it is allocated: dirty
bitmaps, host-memory contents, page tables, zap events; per VM and for the whole service,
with no overshoot from calls running at once; reloads counted; a documented guest_memfd
size limit. A refused call changes nothing and leaves no record."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from app.engine import uapi
from app.engine.errors import KvmError
from app.engine.ops import parse
from app.engine.paging import TablePool
from app.engine.vm import Vm
from app.services import budget
from app.services.vms import VmService
from app.services.whatif import Variant, what_if
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


async def test_page_tables_of_concurrent_calls_never_pass_the_budget(
    db_url: str, make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager splits (dirty logging turned on over 2 MiB leaves) and faults on six VMs at
    once, against a page-table budget far below what they would build: the tables that
    exist at any moment, counted at every allocation, never pass it."""
    limit = 120
    svc = await make_service(
        db_url, snapshot_every=0, page_table_budget_bytes=limit * 4096, trace_records=0
    )
    size = 64 * MIB
    vms = [await _vm(svc) for _ in range(6)]
    for vm in vms:
        await svc.mutate(
            vm, "host_advise", {"userspace_addr": SLOT_HVA, "len": size, "advice": "hugepage"}
        )
        await svc.mutate(vm, "set_user_memory_region", _slot(size))
        await svc.mutate(vm, "access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"})
    live = {"now": svc.ledger.tables(), "peak": 0}
    lock = threading.Lock()
    alloc, release = TablePool.alloc, TablePool.release

    def counted_alloc(pool: TablePool, level: int, gfn: int, root: int) -> int:
        with lock:
            live["now"] += 1
            live["peak"] = max(live["peak"], live["now"])
        return alloc(pool, level, gfn, root)

    def counted_release(pool: TablePool, idx: int) -> None:
        with lock:
            live["now"] -= 1
        release(pool, idx)

    monkeypatch.setattr(TablePool, "alloc", counted_alloc)
    monkeypatch.setattr(TablePool, "release", counted_release)

    async def call(vm: str, op: str, args: dict[str, object]) -> dict[str, object] | None:
        try:
            result, _ = await svc.mutate(vm, op, args)
        except KvmError as e:
            assert e.errno == errno.ENOMEM
            return None
        return result

    calls = []
    for vm in vms:
        calls.append(call(vm, "set_user_memory_region", _slot(size, flags=1)))
        calls.append(call(vm, "access", {"vcpu": 0, "gpa": size, "size": 4096, "access": "read"}))
    results = await asyncio.gather(*calls)
    split = sum(int(r["zap"]["huge_pages_split"]) for r in results[::2] if r and r.get("zap"))
    assert 0 < split < 6 * 32  # some were split, as many as the budget allowed
    assert live["peak"] <= limit
    assert svc.ledger.tables() <= limit
    held = sum(
        [t for t, _ in await asyncio.gather(*(svc.read(vm, budget.tables_held) for vm in vms))]
    )
    assert held <= limit


async def test_reloads_and_forks_are_reserved_before_they_are_built(
    db_url: str, make_service: ServiceFactory
) -> None:
    """An evicted VM's reload and a fork of its snapshot reserve the state they will hold
    first: with the budget taken by another VM meanwhile they answer ENOMEM, and nothing
    was decoded past the budget."""
    svc = await make_service(
        db_url, snapshot_every=0, memory_budget_bytes=1400 * 1024, trace_records=0
    )
    a, b = await _vm(svc), await _vm(svc)
    await svc.mutate(a, "set_user_memory_region", _slot(256 * MIB))
    await svc.mutate(a, "access", {"vcpu": 0, "gpa": 0, "size": 256 * MIB, "access": "write"})
    snap = await svc.create_snapshot(a)
    tables_a, _ = await svc.read(a, budget.tables_held)
    assert svc.evict(a) and svc.ledger.of(a) == 0
    await svc.mutate(b, "set_user_memory_region", _slot(512 * MIB))
    await svc.mutate(b, "access", {"vcpu": 0, "gpa": 0, "size": 512 * MIB, "access": "write"})
    # Neither A's state nor a copy of it fits next to B's.
    assert svc.ledger.total() + tables_a * 4096 > svc.ledger.service_bytes
    reload = svc.read(a, budget.bytes_held)
    fork = svc.create_vm(name=None, from_snapshot=snap["id"])
    for attempt in (reload, fork):
        with pytest.raises(KvmError) as e:
            await attempt
        assert e.value.errno == errno.ENOMEM
        assert svc.ledger.total() <= svc.ledger.service_bytes
        assert svc.loaded_vms().keys() == {b}
    await svc.mutate(b, "set_user_memory_region", _slot(0))  # B lets go of its tables
    held, _ = await svc.read(a, budget.bytes_held)
    assert held == svc.ledger.of(a) and held >= tables_a * 4096


async def test_a_snapshot_in_memory_is_reserved(db_url: str, make_service: ServiceFactory) -> None:
    """The bytes of a snapshot being written are held until stored: reserved first, and
    refused (ENOMEM, nothing stored) when the VM's state and its copy do not fit."""
    svc = await make_service(db_url, snapshot_every=0, memory_budget_bytes=1024 * 1024)
    vm = await _vm(svc)
    for i in range(4):  # 512 KiB of written pages
        data = "5a" * (128 * 1024)
        await svc.mutate(vm, "host_write", {"userspace_addr": HVA + i * 128 * 1024, "data": data})
    with pytest.raises(KvmError) as e:
        await svc.create_snapshot(vm)
    assert e.value.errno == errno.ENOMEM
    assert await svc.list_snapshots(vm) == []
    assert svc.ledger.total() == svc.ledger.of(vm) <= svc.ledger.service_bytes
    svc.ledger.service_bytes = 2 * 1024 * 1024
    await svc.create_snapshot(vm)
    assert len(await svc.list_snapshots(vm)) == 1
    assert svc.ledger.total() == svc.ledger.of(vm)  # the snapshot's reservation is gone


async def test_a_what_if_copy_is_reserved(db_url: str, make_service: ServiceFactory) -> None:
    """A what-if's copy of the VM (held while its variants run) and each fork are in the
    one ledger: too big for what is left is ENOMEM, and all of it is let go after."""
    svc = await make_service(
        db_url, snapshot_every=0, memory_budget_bytes=1024 * 1024, trace_records=0
    )
    vm = await _vm(svc)
    for i in range(4):  # 512 KiB of written pages
        data = "5a" * (128 * 1024)
        await svc.mutate(vm, "host_write", {"userspace_addr": HVA + i * 128 * 1024, "data": data})
    before = svc.ledger.total()
    ops = [{"op": "access", "gpa": 0, "size": 4096}]
    with pytest.raises(KvmError) as e:
        await what_if(svc, vm, variants=[Variant("v")], ops=ops)
    assert e.value.errno == errno.ENOMEM
    assert svc.ledger.total() == before
    svc.ledger.service_bytes = 4 * 1024 * 1024
    out = await what_if(svc, vm, variants=[Variant("a"), Variant("b")], ops=ops)
    assert [row["name"] for row in out["variants"]] == ["a", "b"]
    assert svc.ledger.total() == before


async def _split_workload(svc: VmService) -> str:
    """A VM with four 4 MiB slots on transparent huge pages, each mapped by 2 MiB leaves,
    and 240 KiB of host contents (what it holds is past what creating a VM reserves)."""
    vm = await _vm(svc)
    for i in range(30):
        await svc.mutate(vm, "host_write", {"userspace_addr": HVA + i * 8192, "data": "ab" * 8192})
    await svc.mutate(
        vm, "host_advise", {"userspace_addr": SLOT_HVA, "len": GIB, "advice": "hugepage"}
    )
    for i in range(4):
        region = {**_slot(4 * MIB), "slot": i, "guest_phys_addr": i * GIB}
        region["userspace_addr"] = SLOT_HVA + i * 4 * MIB
        await svc.mutate(vm, "set_user_memory_region", region)
        await svc.mutate(
            vm, "access", {"vcpu": 0, "gpa": i * GIB, "size": 4 * MIB, "access": "write"}
        )
    return vm


def _timeless(answer: object) -> object:
    """An answer without its wall-clock fields (zap events' `at` and `duration_us`)."""
    if isinstance(answer, dict):
        return {k: _timeless(v) for k, v in answer.items() if k not in ("at", "duration_us")}
    return answer.errno if isinstance(answer, KvmError) else answer


def _logging_on(i: int) -> tuple[str, dict[str, int]]:
    region = {**_slot(4 * MIB, flags=1), "slot": i, "guest_phys_addr": i * GIB}
    region["userspace_addr"] = SLOT_HVA + i * 4 * MIB
    return "set_user_memory_region", region


async def test_a_batch_is_refused_where_the_calls_one_by_one_would_be(
    db_url: str, make_service: ServiceFactory
) -> None:
    """A batch settles what the VM holds after its last step, not after each one, so its
    earlier grants (zap-event bytes never used) count against the quota meanwhile; where
    they refuse or shorten a grant they are settled first. Turning dirty logging on for four
    slots (each an eager split of two 2 MiB leaves) under tighter and tighter VM quotas: the
    batch applies, splits and refuses exactly what four single calls do."""
    probe = await make_service(db_url, snapshot_every=0)
    base = probe.ledger.of(await _split_workload(probe))
    seen = set()
    # Past 48 KiB over what the VM ends up holding, its own last calls fit.
    for extra in range(48 * 1024, 176 * 1024, 8 * 1024):
        svc = await make_service(db_url, snapshot_every=0, vm_memory_budget_bytes=base + extra)
        one, batch = await _split_workload(svc), await _split_workload(svc)
        singles: list[object] = []
        for i in range(4):
            name, args = _logging_on(i)
            try:
                singles.append(_timeless((await svc.mutate(one, name, args))[0]))
            except KvmError as e:
                singles.append(e.errno)
                break
        outcomes, _ = await svc.mutate_batch(batch, [_logging_on(i) for i in range(4)])
        assert [_timeless(o) for o in outcomes] == singles, extra
        splits = [await svc.read(v, lambda vm: vm.stats()["pages_2m"]) for v in (one, batch)]
        assert splits[0] == splits[1], extra
        assert svc.ledger.of(one) == svc.ledger.of(batch), extra
        seen.add(tuple(x if isinstance(x, int) else "ok" for x in singles))
    assert len(seen) >= 3, seen  # refused early, refused late, all applied


_MMAP_SHARED = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP | uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)


def test_bytes_held_of_an_engine_vm_is_the_sum_of_its_parts() -> None:
    """The direct reading of an engine VM (every part present) and the part-by-part one (a
    test double's) agree, with every part holding something: tables, trace, a dirty bitmap,
    host pages, guest_memfd pages and zap events."""
    vm = Vm.create(0, 1)
    fd = vm.apply(parse("create_guest_memfd", dict(size=4 * MIB, flags=_MMAP_SHARED)))["fd"]
    for name, args in [
        ("set_user_memory_region", dict(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                                        userspace_addr=HVA, flags=1)),
        ("host_write", dict(userspace_addr=HVA + 0x40, data="feedface")),
        ("gmem_write", dict(fd=fd, offset=100, data="ff" * 5000)),
        ("set_user_memory_region", dict(slot=0, guest_phys_addr=0, memory_size=0,
                                        userspace_addr=0)),
        ("set_user_memory_region", dict(slot=1, guest_phys_addr=0, memory_size=2 * MIB,
                                        userspace_addr=HVA, flags=1)),
        ("access", dict(vcpu=0, gpa=0, size=2 * MIB, access="write")),
    ]:  # fmt: skip
        vm.apply(parse(name, args))
    parts = (
        vm.mmu.pool.live, vm.mmu.trace.nbytes, vm.dirty, vm.host.contents,
        [f.contents for f in vm.gmem.files.values()], vm.events,
    )  # fmt: skip
    assert all(parts), parts
    assert budget.bytes_held(vm) == budget._bytes_held_of_parts(vm) > 0
