"""The trace ring: the kvmmmu tracepoints in the kernel's order and TP_printk text
(arch/x86/kvm/mmu/mmutrace.h, tdp_mmu.c; docs/trace.md)."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine import Vm, codec, spte
from app.engine.ops import parse
from app.engine.trace import FROZEN, NONPRESENT, RECORD, Kind, TraceRing, render

from .mmu import DEFAULT, DISABLE_QUIRKS2, HVA, LOG_DIRTY, MB, PAGE, SLOT_ZAP_ALL, region

SHADOW_NONPRESENT = 1 << 63  # SHADOW_NONPRESENT_VALUE: only SUPPRESS_VE
FROZEN_SPTE = SHADOW_NONPRESENT | 0x5A0


def access(vm: Vm, gpa: int, size: int = PAGE, kind: str = "write") -> None:
    vm.apply(parse("access", dict(vcpu=0, gpa=gpa, size=size, access=kind)))


def records(vm: Vm) -> np.ndarray:
    return vm.mmu.trace.records()


def changed(recs: np.ndarray) -> list[tuple[int, int, int, int]]:
    r = recs[recs["kind"] == Kind.SPTE_CHANGED]
    return [
        (int(g), int(lv), int(a), int(b))
        for g, lv, a, b in zip(r["gfn"], r["level"], r["a"], r["b"], strict=True)
    ]


def test_the_spec_constants_are_the_kernels() -> None:
    assert int(NONPRESENT) == SHADOW_NONPRESENT == spte.SHADOW_NONPRESENT_VALUE
    assert int(FROZEN) == FROZEN_SPTE == spte.FROZEN_SPTE


def test_a_first_fault_traces_request_links_leaf_then_set_spte() -> None:
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0)
    recs = records(vm)
    kinds = [Kind(int(k)) for k in recs["kind"]]
    assert kinds == [
        Kind.SPTE_REQUESTED,
        Kind.SPTE_CHANGED,  # level 4 → level-3 table
        Kind.SPTE_CHANGED,  # level 3 → level-2 table
        Kind.SPTE_CHANGED,  # level 2 → level-1 table
        Kind.SPTE_CHANGED,  # the leaf
        Kind.SET_SPTE,
    ]
    assert [int(x) for x in recs["level"][1:5]] == [4, 3, 2, 1]
    assert set(recs["cpu"].tolist()) == {0}
    leaf = int(recs["b"][4])
    assert leaf & spte.SPTE_MMU_PRESENT and int(recs["a"][4]) == SHADOW_NONPRESENT
    assert int(recs["a"][5]) == leaf  # kvm_mmu_set_spte prints the new SPTE
    lines = list(render(recs))
    assert lines[0].split(": ", 1)[1].split() == [
        "kvm_mmu_spte_requested:",
        "gfn",
        "0",
        "pfn",
        f"{HVA >> 12:x}",
        "level",
        "1",
    ]
    assert "kvm_mmu_set_spte:" in lines[5] and f"spte {leaf:x} (rwx) level 1 at " in lines[5]


def test_each_page_of_a_run_is_its_own_fault() -> None:
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0, 3 * PAGE)
    recs = records(vm)
    leaves = recs[(recs["kind"] == Kind.SET_SPTE)]
    assert leaves["gfn"].tolist() == [0, 1, 2]
    assert int(np.count_nonzero(recs["kind"] == Kind.SPTE_REQUESTED)) == 3
    assert recs["seq"].tolist() == list(range(1, len(recs) + 1))


def test_a_precise_slot_zap_traces_each_leaf_to_nonpresent_in_gfn_order() -> None:
    vm = Vm.create(DEFAULT, 1)
    vm.apply(parse("enable_cap", dict(cap=DISABLE_QUIRKS2, flags=0, args=[SLOT_ZAP_ALL, 0, 0, 0])))
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 3 * MB, 2 * PAGE)
    access(vm, 0, 2 * PAGE)
    mark = vm.mmu.trace.written
    region(vm, 0, 0, 0, HVA)  # delete: kvm_tdp_mmu_unmap_gfn_range over the slot
    recs = vm.mmu.trace.records(after=mark)
    assert changed(recs) == [
        (g, 1, old, SHADOW_NONPRESENT)
        for g, old in zip([0, 1, 0x300, 0x301], [int(x) for x in recs["a"]], strict=True)
    ]
    assert all(int(a) & spte.SPTE_MMU_PRESENT for a in recs["a"])
    assert not np.any(recs["kind"] == Kind.ZAP_ALL_FAST)


def test_the_fast_zap_traces_the_generation_then_tears_roots_down_in_two_passes() -> None:
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0)
    mark = vm.mmu.trace.written
    region(vm, 0, 0, 0, HVA)  # delete with SLOT_ZAP_ALL: kvm_mmu_zap_all_fast
    recs = vm.mmu.trace.records(after=mark)
    first = recs[0]
    assert Kind(int(first["kind"])) is Kind.ZAP_ALL_FAST and int(first["c"]) == 0
    assert "kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 0 used_pages 0" in " ".join(
        next(render(recs[:1])).split()
    )
    ch = changed(recs[1:])
    # Pass 1 (1 GiB level): the level-3 entry goes non-present, then its level-2 table is
    # removed under the read lock: all 512 entries frozen, the level-1 table's after its
    # parent entry.
    assert ch[0][:2] == (0, 3) and ch[0][3] == SHADOW_NONPRESENT
    assert ch[1][:2] == (0, 2) and ch[1][3] == FROZEN_SPTE
    assert ch[2][:2] == (0, 1) and ch[2][2] & spte.SPTE_MMU_PRESENT and ch[2][3] == FROZEN_SPTE
    assert ch[3] == (1, 1, SHADOW_NONPRESENT, FROZEN_SPTE)  # non-present entries too
    level1 = [c for c in ch if c[1] == 1]
    assert len(level1) == 512 and [c[0] for c in level1] == list(range(512))
    # Pass 2 (the root's level): the level-4 entry, then every entry of its emptied table.
    top = next(i for i, c in enumerate(ch) if c[1] == 4)
    assert ch[top][3] == SHADOW_NONPRESENT
    assert len(ch) - top - 1 == 512 and all(
        c[1] == 3 and c[3] == FROZEN_SPTE for c in ch[top + 1 :]
    )


def test_vm_destruction_traces_present_entries_only() -> None:
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0, 2 * PAGE)
    mark = vm.mmu.trace.written
    vm.apply(parse("destroy", {}))
    ch = changed(vm.mmu.trace.records(after=mark))
    # Write-locked teardown (kvm_mmu_uninit_tdp_mmu): L3 entry, L2 entry, two leaves, L4 entry.
    assert [(g, lv) for g, lv, _, _ in ch] == [(0, 3), (0, 2), (0, 1), (1, 1), (0, 4)]
    assert [new for *_, new in ch] == [
        SHADOW_NONPRESENT,
        FROZEN_SPTE,
        FROZEN_SPTE,
        FROZEN_SPTE,
        SHADOW_NONPRESENT,
    ]


def thp_vm() -> Vm:
    """Slot 0 = [0, 4 MiB) on transparent huge pages."""
    vm = Vm.create(DEFAULT, 1)
    vm.apply(parse("host_advise", dict(userspace_addr=HVA, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, HVA)
    return vm


def test_dirty_logging_traces_each_split_and_each_write_protection() -> None:
    vm = thp_vm()
    access(vm, 0, 2 * MB)  # one 2 MiB leaf
    mark = vm.mmu.trace.written
    region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)
    recs = vm.mmu.trace.records(after=mark)
    split = recs[recs["kind"] == Kind.SPLIT_HUGE_PAGE]
    assert len(split) == 1 and int(split["level"][0]) == 2 and int(split["c"][0]) == 0
    ch = changed(recs)
    # The link replaces the huge leaf before the split is traced (tdp_mmu_split_huge_page).
    assert ch[0][1] == 2 and ch[0][2] & spte.EPT_PS and not ch[0][3] & spte.EPT_PS
    wp = ch[1:]
    assert len(wp) == 512 and all(old & ~new == spte.EPT_W for _, _, old, new in wp)


def test_the_ring_keeps_the_newest_records_and_numbers_them_all() -> None:
    ring = TraceRing(capacity=100)
    for i in range(7):
        ring.append(Kind.SPTE_CHANGED, np.arange(i * 30, i * 30 + 30), 1, 0, 0)
    kept = ring.records()
    assert ring.written == 210 and len(kept) == 100
    assert kept["seq"].tolist() == list(range(111, 211))
    assert kept["gfn"].tolist() == list(range(110, 210))
    assert ring.records(after=200)["seq"].tolist() == list(range(201, 211))
    ring.append(Kind.SPTE_CHANGED, np.arange(1000), 1, 0, 0)  # more than it holds at once
    assert ring.records()["gfn"].tolist() == list(range(900, 1000))
    ring.resize(10)
    assert ring.records()["seq"].tolist() == list(range(1201, 1211))
    ring.append(Kind.SPTE_CHANGED, 5, 1, 0, 0)
    assert ring.records()["seq"][-1] == 1211 and len(ring.records()) == 10


def test_an_idle_ring_holds_little_and_a_zero_capacity_holds_nothing() -> None:
    assert TraceRing().nbytes <= 64 * RECORD.itemsize
    ring = TraceRing(capacity=300)
    ring.append(Kind.SPTE_CHANGED, np.arange(200), 1, 0, 0)
    ring.records()  # built: the columns grew past their first 64 rows
    columns = sum(int(c.nbytes) for c in ring._cols.values())
    assert ring.nbytes == columns > 64 * RECORD.itemsize
    off = TraceRing(capacity=0)
    off.append(Kind.SPTE_CHANGED, np.arange(10), 1, 0, 0)
    assert off.written == 0 and len(off.records()) == 0


def test_tracing_changes_nothing_the_mmu_does() -> None:
    calls = [
        ("host_advise", dict(userspace_addr=HVA, len=4 * MB, advice="hugepage")),
        (
            "set_user_memory_region",
            dict(slot=0, guest_phys_addr=0, memory_size=4 * MB, userspace_addr=HVA),
        ),
        ("access", dict(vcpu=0, gpa=0, size=3 * MB, access="write")),
        (
            "set_user_memory_region",
            dict(
                slot=0, flags=LOG_DIRTY, guest_phys_addr=0, memory_size=4 * MB, userspace_addr=HVA
            ),
        ),
        ("access", dict(vcpu=0, gpa=5 * PAGE, size=PAGE, access="write")),
        (
            "set_user_memory_region",
            dict(slot=0, guest_phys_addr=0, memory_size=0, userspace_addr=HVA),
        ),
    ]

    def run(capacity: int) -> Vm:
        vm = Vm.create(DEFAULT, 1)
        vm.mmu.trace.resize(capacity)
        for t, (name, args) in enumerate(calls):
            vm.apply(parse(name, args), at=1.0 + t, durations=[1, 1, 1])
        return vm

    traced, silent = run(4096), run(0)
    assert traced.mmu.trace.written > 0 and silent.mmu.trace.written == 0
    assert codec.digest(traced) == codec.digest(silent)


@pytest.mark.parametrize("teardown", ["fast_zap", "destroy"])
def test_a_small_ring_keeps_exactly_the_tail_a_large_one_holds(teardown: str) -> None:
    """Batches pushed out unbuilt and teardowns built only for their tail (under the read
    lock every entry of a removed table, under the write lock its present ones): the same
    records as building everything and keeping the newest."""

    def run(capacity: int) -> tuple[np.ndarray, int]:
        vm = Vm.create(DEFAULT, 2)
        vm.mmu.trace.resize(capacity)
        region(vm, 0, 0, 64 * MB, HVA)
        region(vm, 1, 1 << 32, 8 * MB, HVA + (1 << 32))
        for i, (vcpu, gpa, size) in enumerate(
            [(0, 0, 40 * MB), (1, 1 << 32, 8 * MB), (0, 63 * MB, MB), (1, 50 * MB, 3 * PAGE)]
        ):
            vm.apply(parse("access", dict(vcpu=vcpu, gpa=gpa, size=size, access="write")), at=i)
        if teardown == "destroy":
            vm.apply(parse("destroy", {}), at=9)
        else:
            vm.apply(
                parse(
                    "set_user_memory_region",
                    dict(slot=1, guest_phys_addr=1 << 32, memory_size=0, userspace_addr=HVA),
                ),
                at=9,
            )
        return vm.mmu.trace.records(), vm.mmu.trace.written

    full, written = run(1 << 20)
    assert len(full) == written > 50000  # faults, then a teardown larger than small rings
    frozen = (full["level"] == 1) & (full["b"] == FROZEN_SPTE)
    # 10,240 + 2,048 + 256 + 3 pages mapped in 20 + 4 + 1 + 1 leaf tables: the write lock
    # freezes the present entries, the read lock all 512 of each table.
    assert np.count_nonzero(frozen) == (12547 if teardown == "destroy" else 26 * 512)
    for keep in (1, 300, 700, 5000, 30000):
        tail, counted = run(keep)
        assert np.array_equal(tail, full[-keep:]) and counted == written, keep
