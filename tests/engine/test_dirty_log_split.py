"""Eager splitting and huge-page recovery around dirty logging, leaf by leaf: what the child
leaves hold (tdp_mmu_split_huge_page), 1 GiB leaves split twice, the trace of each split and
write-protection, the address space a slot's roots belong to, and which tables
kvm_tdp_mmu_recover_huge_pages collapses when logging stops (kvm-memslots.md §3.4)."""

from __future__ import annotations

import errno

import pytest

from app.engine import Vm, spte
from app.engine.ops import parse
from app.engine.trace import Kind

from . import mmu as kit

MB, GB, PAGE = kit.MB, kit.GB, kit.PAGE
ADDR = spte.SPTE_BASE_ADDR_MASK


def raw(vm: Vm, gpa: int) -> int:
    leaf = kit.leaf(vm, gpa)
    assert leaf is not None, hex(gpa)
    return int(leaf["raw"], 16)


def thp_slot(vm: Vm, gpa: int, size: int, hva: int = kit.HVA, flags: int = 0) -> None:
    kit.hugepage(vm, hva, size)
    kit.region(vm, 0, gpa, size, hva, flags)


def test_children_keep_the_huge_leafs_bits_but_ps_and_get_consecutive_pfns() -> None:
    vm = Vm.create(kit.DEFAULT, 1)
    thp_slot(vm, 4 * MB, 4 * MB)
    kit.access(vm, 4 * MB, 4 * MB)
    huge = {gpa: raw(vm, gpa) for gpa in (4 * MB, 6 * MB)}
    assert all(h & spte.EPT_PS for h in huge.values())
    zap = kit.region(vm, 0, 4 * MB, 4 * MB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert (zap["cause"], zap["path"]) == ("dirty_log", "enable_dirty_logging")
    assert (zap["as_id"], zap["slot"], zap["gfn_start"], zap["gfn_end"]) == (0, 0, 1024, 2048)
    assert (zap["huge_pages_split"], zap["sptes_write_protected"]) == (2, 1024)
    for base, h in huge.items():
        for k in (0, 1, 300, 511):
            want = (h & ~ADDR & ~spte.EPT_PS & ~spte.EPT_W) | ((h & ADDR) + k * PAGE)
            assert raw(vm, base + k * PAGE) == want, (hex(base), k)
    assert kit.pages(vm) == (1024, 0, 0)
    kit.check(vm)


def test_a_slot_spanning_two_tables_counts_the_splits_of_both() -> None:
    """2 MiB leaves on both sides of a 1 GiB boundary live in two level-2 tables."""
    vm = Vm.create(kit.DEFAULT, 1)
    thp_slot(vm, GB - 4 * MB, 8 * MB, kit.HVA + GB - 4 * MB)
    kit.access(vm, GB - 4 * MB, 8 * MB)
    assert kit.pages(vm) == (0, 4, 0)
    zap = kit.region(vm, 0, GB - 4 * MB, 8 * MB, kit.HVA + GB - 4 * MB, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 4
    assert kit.pages(vm) == (2048, 0, 0)
    kit.check(vm)


def gig_vm() -> Vm:
    """Slot 0 = [1 GiB, 2 GiB) on 1 GiB hugetlbfs pages, mapped by one 1 GiB leaf."""
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("host_map", dict(userspace_addr=kit.HVA, len=GB, page_size=GB)))
    kit.region(vm, 0, GB, GB, kit.HVA)
    kit.access(vm, GB + 5 * PAGE)
    assert kit.pages(vm) == (0, 0, 1)
    return vm


def test_a_1g_leaf_splits_into_2m_leaves_and_those_into_4k_leaves() -> None:
    vm = gig_vm()
    top = raw(vm, GB)
    zap = kit.region(vm, 0, GB, GB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 1 + 512
    assert kit.pages(vm) == (512 * 512, 0, 0)
    for off in (0, 5 * PAGE, 3 * MB + 7 * PAGE, GB - PAGE):
        want = (top & ~ADDR & ~spte.EPT_PS & ~spte.EPT_W) | ((top & ADDR) + off)
        assert raw(vm, GB + off) == want, hex(off)
    kit.check(vm)


def test_stopping_logging_rebuilds_the_1g_leaf() -> None:
    vm = gig_vm()
    kit.region(vm, 0, GB, GB, kit.HVA, kit.LOG_DIRTY)
    zap = kit.region(vm, 0, GB, GB, kit.HVA)["zap"]
    assert (zap["cause"], zap["path"]) == ("dirty_log", "recover_huge_pages")
    assert (zap["as_id"], zap["slot"], zap["tlb_flushes"]) == (0, 0, 1)
    assert kit.pages(vm) == (0, 0, 1)
    kit.check(vm)


def test_splits_and_write_protections_are_traced_at_their_gfns() -> None:
    vm = Vm.create(kit.DEFAULT, 1)
    thp_slot(vm, 4 * MB, 4 * MB)
    kit.access(vm, 4 * MB, 4 * MB)
    huge = [raw(vm, 4 * MB), raw(vm, 6 * MB)]
    mark = vm.mmu.trace.written
    kit.region(vm, 0, 4 * MB, 4 * MB, kit.HVA, kit.LOG_DIRTY)
    recs = vm.mmu.trace.records(after=mark)
    split = recs[recs["kind"] == Kind.SPLIT_HUGE_PAGE]
    assert split["gfn"].tolist() == [1024, 1536]
    assert split["level"].tolist() == [2, 2] and split["a"].tolist() == huge
    assert split["c"].tolist() == [0, 0]
    ch = recs[recs["kind"] == Kind.SPTE_CHANGED]
    links = ch[ch["level"] == 2]
    assert links["gfn"].tolist() == [1024, 1536] and links["a"].tolist() == huge
    wp = ch[ch["level"] == 1]
    assert wp["gfn"].tolist() == list(range(1024, 2048))
    assert all(int(a) & ~int(b) == spte.EPT_W for a, b in zip(wp["a"], wp["b"], strict=True))


def test_a_split_stopped_by_the_budget_traces_enomem_at_the_leaf_left_whole() -> None:
    vm = Vm.create(kit.DEFAULT, 1)
    thp_slot(vm, 4 * MB, 8 * MB)
    kit.access(vm, 4 * MB, 8 * MB)
    left = raw(vm, 8 * MB)  # the third leaf: the first one with no table left
    vm.table_budget = vm.stats()["page_tables"] + 2
    mark = vm.mmu.trace.written
    zap = kit.region(vm, 0, 4 * MB, 8 * MB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 2
    recs = vm.mmu.trace.records(after=mark)
    split = recs[recs["kind"] == Kind.SPLIT_HUGE_PAGE]
    assert split["gfn"].tolist() == [1024, 1536, 2048]
    assert split["c"].tolist() == [0, 0, -errno.ENOMEM]
    assert int(split["level"][2]) == 2 and int(split["a"][2]) == left
    assert kit.pages(vm) == (1024, 2, 0)


@pytest.mark.parametrize("manual", [0, 1])
def test_dirty_logging_touches_only_the_slots_address_space(manual: int) -> None:
    """SMRAM over the same GFNs (address space 1) keeps its leaves whole and writable while
    the slot of address space 0 starts logging, is harvested and stops (the roots of
    kvm_mmu_slot_apply_flags, kvm_get/clear_dirty_log_protect are the slot's as_id's)."""
    vm = Vm.create(kit.DEFAULT, 2)
    if manual:
        vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[1])))
    smram = kit.HVA + 64 * MB  # 4 KiB host pages
    thp_slot(vm, 0, 2 * MB)
    kit.region(vm, 1 << 16, 0, 2 * MB, smram)
    kit.access(vm, 0, 2 * MB)
    vm.apply(parse("set_vcpu_smm", dict(vcpu=1, smm=True)))
    vm.apply(parse("access", dict(vcpu=1, gpa=0, size=2 * MB, access="read")))
    # SMRAM becomes THP-backed only now: its 4K leaves could collapse, but are not the
    # logging slot's to collapse.
    kit.hugepage(vm, smram, 2 * MB)

    def sptes() -> dict[int, dict[str, int]]:
        return {r["as_id"]: r["sptes"] for r in vm.roots()}

    assert sptes() == {0: {"4k": 0, "2m": 1, "1g": 0}, 1: {"4k": 512, "2m": 0, "1g": 0}}
    zap = kit.region(vm, 0, 0, 2 * MB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert (zap["huge_pages_split"], zap["sptes_write_protected"]) == (1, 512)
    assert sptes() == {0: {"4k": 512, "2m": 0, "1g": 0}, 1: {"4k": 512, "2m": 0, "1g": 0}}
    kit.access(vm, 0, PAGE, "write")
    log = vm.apply(parse("get_dirty_log", dict(slot=0)))
    if manual:
        assert "sptes_write_protected" not in log
        word = "AQAAAAAAAAA="  # page 0
        res = vm.apply(
            parse("clear_dirty_log", dict(slot=0, first_page=0, num_pages=64, bitmap=word))
        )
        assert res == {"cleared": 1, "sptes_write_protected": 1}
    else:
        assert log["sptes_write_protected"] == 1
    vm.apply(parse("set_vcpu_smm", dict(vcpu=1, smm=True)))
    zap = kit.region(vm, 0, 0, 2 * MB, kit.HVA)["zap"]
    assert (zap["huge_pages_recovered"], zap["tlb_flushes"]) == (1, 1)
    assert sptes() == {0: {"4k": 0, "2m": 1, "1g": 0}, 1: {"4k": 512, "2m": 0, "1g": 0}}
    kit.check(vm)


def test_recovery_collapses_each_table_that_may_be_huge_and_skips_the_others() -> None:
    """Slot [1 MiB, 8 MiB), logging from its creation, so every fault maps 4 KiB. When logging
    stops, each 2 MiB block is judged on its own (kvm_tdp_mmu_recover_huge_pages, with
    kvm_mmu_max_mapping_level): [0, 2M) is not wholly in the slot, [2M, 4M) has 4 KiB host
    pages, [4M, 6M) is THP now but a host page discarded there was not faulted in again, and
    only [6M, 8M) collapses; its huge leaf maps the block's first host page even though the
    first 4 KiB leaf of its table was at page 300."""
    vm = Vm.create(kit.DEFAULT, 1)
    hva = kit.HVA + MB  # congruent with the GPA modulo 2 MiB
    kit.region(vm, 0, MB, 7 * MB, hva, kit.LOG_DIRTY)
    kit.hugepage(vm, kit.HVA + 6 * MB, 2 * MB)
    kit.access(vm, MB, 5 * MB, "write")
    kit.access(vm, 6 * MB + 300 * PAGE, 2 * MB - 300 * PAGE, "write")
    gone = kit.HVA + 4 * MB + 8 * PAGE
    vm.apply(parse("host_discard", dict(userspace_addr=gone, len=PAGE)))
    kit.hugepage(vm, kit.HVA + 4 * MB, 2 * MB)
    assert kit.pages(vm) == (256 + 512 + 511 + 212, 0, 0)
    zap = kit.region(vm, 0, MB, 7 * MB, hva)["zap"]
    assert (zap["huge_pages_recovered"], zap["tlb_flushes"]) == (1, 1)
    assert kit.pages(vm) == (256 + 512 + 511, 1, 0)
    top = kit.leaf(vm, 6 * MB)
    assert top is not None and top["level"] == 2
    assert top["pfn"] == (kit.HVA + 6 * MB) // PAGE
    kit.check(vm)


def test_recovery_passes_over_a_huge_leaf_to_the_table_after_it() -> None:
    """With KVM_DIRTY_LOG_INITIALLY_SET nothing is split when logging starts: the 2 MiB leaf
    stays, the next block gets 4 KiB leaves, and stopping logging collapses that one."""
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[3])))
    thp_slot(vm, 0, 4 * MB)
    kit.access(vm, 0, 2 * MB)
    kit.region(vm, 0, 0, 4 * MB, kit.HVA, kit.LOG_DIRTY)
    kit.access(vm, 2 * MB, 2 * MB, "write")
    assert kit.pages(vm) == (512, 1, 0)
    mark = vm.mmu.trace.written
    zap = kit.region(vm, 0, 0, 4 * MB, kit.HVA)["zap"]
    assert zap["huge_pages_recovered"] == 1
    assert kit.pages(vm) == (0, 2, 0)
    # The table's link at level 2 becomes the huge leaf now installed there.
    recs = vm.mmu.trace.records(after=mark)
    ch = recs[(recs["kind"] == Kind.SPTE_CHANGED) & (recs["level"] == 2)]
    assert ch["gfn"].tolist() == [512] and ch["b"].tolist() == [raw(vm, 2 * MB)]
    kit.check(vm)


def test_logging_again_protects_only_leaves_that_are_writable() -> None:
    """Leaves on 4 KiB host pages stay 4 KiB and write-protected when logging stops; starting
    it again protects only those a write made writable since."""
    vm = Vm.create(kit.DEFAULT, 1)
    kit.region(vm, 0, 0, 64 * PAGE, kit.HVA)
    kit.access(vm, 0, 64 * PAGE, "write")
    zap = kit.region(vm, 0, 0, 64 * PAGE, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["sptes_write_protected"] == 64
    kit.region(vm, 0, 0, 64 * PAGE, kit.HVA)
    kit.access(vm, 5 * PAGE, 3 * PAGE, "write")  # the fast path makes three writable again
    zap = kit.region(vm, 0, 0, 64 * PAGE, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["sptes_write_protected"] == 3
    kit.check(vm)


def test_stopping_logging_on_a_vm_without_vcpus() -> None:
    vm = Vm.create(kit.DEFAULT, 0)
    kit.region(vm, 0, 0, 16 * PAGE, kit.HVA, kit.LOG_DIRTY)
    zap = kit.region(vm, 0, 0, 16 * PAGE, kit.HVA)["zap"]
    assert (zap["path"], zap["huge_pages_recovered"], zap["tlb_flushes"]) == (
        "recover_huge_pages",
        0,
        0,
    )


def across_1g(host: dict | None = None) -> Vm:
    """Slot 0 = [1G - 2M, 1G + 2M): 4K leaves below 1 GiB (host pages not huge there), one
    2M leaf above it (THP). The 4K leaves' table comes first in a walk of the slot, and it
    hangs under another level-2 table than the 2M leaf."""
    vm = Vm.create(kit.DEFAULT, 1, host=host)
    kit.hugepage(vm, kit.HVA + kit.M2, kit.M2)
    kit.region(vm, 0, GB - kit.M2, 2 * kit.M2, kit.HVA)
    kit.access(vm, GB - kit.M2, 2 * kit.M2, "write")
    assert kit.pages(vm) == (512, 1, 0)
    assert kit.leaf(vm, GB)["level"] == 2
    return vm


def test_eager_split_goes_on_past_4k_leaves_to_the_huge_leaf_after_them() -> None:
    """kvm_mmu_slot_try_split_huge_pages → tdp_mmu_split_huge_pages_root splits every huge
    leaf of the slot, whatever lies before it in the walk."""
    vm = across_1g()
    zap = kit.region(vm, 0, GB - kit.M2, 2 * kit.M2, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 1
    assert zap["sptes_write_protected"] == 1024
    assert kit.pages(vm) == (1024, 0, 0)
    kit.check(vm)


def test_pml_write_protects_the_huge_leaf_after_4k_leaves() -> None:
    """kvm_mmu_slot_apply_flags with PML and no eager split: the 4K leaves lose D and stay
    writable, and kvm_mmu_slot_remove_write_access(PG_LEVEL_2M) write-protects every huge
    leaf of the slot, here the one past the 4K leaves' table."""
    vm = across_1g({"enable_pml": True, "eager_page_split": False})
    zap = kit.region(vm, 0, GB - kit.M2, 2 * kit.M2, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert (zap["huge_pages_split"], zap["sptes_write_protected"]) == (0, 1)
    huge = kit.leaf(vm, GB)
    assert (huge["level"], huge["w"]) == (2, False)
    small = kit.leaf(vm, GB - PAGE)
    assert (small["level"], small["w"]) == (1, True)
    kit.check(vm)


def test_without_eager_split_huge_leaves_are_write_protected_and_traced_at_their_gfns() -> None:
    """kvm_mmu_slot_remove_write_access without eager split: each 2M leaf loses W where it
    is (kvm_tdp_mmu_spte_changed at its first GFN, level 2)."""
    vm = Vm.create(kit.DEFAULT, 1, host={"eager_page_split": False})
    thp_slot(vm, 4 * MB, 4 * MB)
    kit.access(vm, 4 * MB, 4 * MB, "write")
    huge = [raw(vm, 4 * MB), raw(vm, 6 * MB)]
    mark = vm.mmu.trace.written
    zap = kit.region(vm, 0, 4 * MB, 4 * MB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert (zap["huge_pages_split"], zap["sptes_write_protected"]) == (0, 2)
    recs = vm.mmu.trace.records(after=mark)
    ch = recs[recs["kind"] == Kind.SPTE_CHANGED]
    assert ch["gfn"].tolist() == [1024, 1536] and ch["level"].tolist() == [2, 2]
    assert ch["a"].tolist() == huge
    assert [int(b) for b in ch["b"]] == [h & ~spte.EPT_W for h in huge]
    kit.check(vm)


def test_eager_split_goes_on_past_a_2m_leaf_to_a_1g_leaf_in_the_next_level_3_table() -> None:
    """kvm_mmu_slot_try_split_huge_pages splits every huge leaf of the slot: here a 2M leaf
    just below 512 GiB and a 1G leaf just above it, each in its own level-3 table, so the
    walk meets the 2M leaf's table first."""
    top = 512 * GB
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("host_map", dict(userspace_addr=kit.HVA + GB, len=GB, page_size=GB)))
    kit.hugepage(vm, kit.HVA + GB - kit.M2, kit.M2)
    kit.region(vm, 0, top - kit.M2, GB + kit.M2, kit.HVA + GB - kit.M2)
    kit.access(vm, top - kit.M2, PAGE, "write")
    kit.access(vm, top, PAGE, "write")
    assert kit.pages(vm) == (0, 1, 1)
    zap = kit.region(vm, 0, top - kit.M2, GB + kit.M2, kit.HVA + GB - kit.M2, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 1 + 1 + 512
    assert kit.pages(vm) == (512 + 512 * 512, 0, 0)
    kit.check(vm)
