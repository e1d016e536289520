"""Eager huge-page splitting stops at the page-table budget (kvm-memslots.md §3.4 b): each
split costs one table, the split count equals the tables that were left, and the pool never
holds more tables than the budget. Both callers of the split are covered: enabling dirty
logging and KVM_CLEAR_DIRTY_LOG with KVM_DIRTY_LOG_INITIALLY_SET."""

from __future__ import annotations

import base64

import pytest

from app.engine import Vm
from app.engine.dirty import split_tables_needed
from app.engine.ops import parse

from . import mmu as kit

HUGE_LEAVES = 4  # [0, 8M) on THP, fully written: four 2M leaves
TABLES = 3  # root, L3, L2 (4-level paging): what the four leaves need
SLOT_PAGES = 4 * 512


def huge_vm(manual: int = 0) -> Vm:
    vm = Vm.create(kit.DEFAULT, 1)
    if manual:
        vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[manual])))
    kit.hugepage(vm, kit.HVA, HUGE_LEAVES * kit.M2)
    kit.region(vm, 0, 0, HUGE_LEAVES * kit.M2, kit.HVA)
    kit.access(vm, 0, HUGE_LEAVES * kit.M2, "write")
    assert kit.pages(vm) == (0, HUGE_LEAVES, 0)
    assert vm.stats()["page_tables"] == TABLES
    return vm


def shrink_budget(vm: Vm, tables: int) -> None:
    """The budget the service gives the VM, lowered after the faults (the up-front check of
    an access reserves more than the faults above use)."""
    vm.table_budget = tables


@pytest.mark.parametrize("room", [0, 1, 2, 3, HUGE_LEAVES, HUGE_LEAVES + 1])
def test_enabling_logging_splits_exactly_as_many_leaves_as_the_budget_has_tables(
    room: int,
) -> None:
    vm = huge_vm()
    shrink_budget(vm, TABLES + room)
    zap = kit.region(vm, 0, 0, HUGE_LEAVES * kit.M2, kit.HVA, kit.LOG_DIRTY)["zap"]
    split = min(room, HUGE_LEAVES)
    assert zap["huge_pages_split"] == split
    assert vm.stats()["page_tables"] == TABLES + split <= vm.table_budget
    assert kit.pages(vm) == (512 * split, HUGE_LEAVES - split, 0)
    kit.check(vm)


@pytest.mark.parametrize("room", [0, 1, 2, HUGE_LEAVES])
def test_clear_dirty_log_with_initially_set_splits_only_within_the_budget(room: int) -> None:
    vm = huge_vm(manual=3)  # MANUAL_PROTECT | INITIALLY_SET: nothing split at enable
    kit.region(vm, 0, 0, HUGE_LEAVES * kit.M2, kit.HVA, kit.LOG_DIRTY)
    assert kit.pages(vm) == (0, HUGE_LEAVES, 0)
    shrink_budget(vm, TABLES + room)
    every = base64.b64encode(b"\xff" * (SLOT_PAGES // 8)).decode()
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=SLOT_PAGES, bitmap=every),
        )
    )
    assert out["cleared"] == SLOT_PAGES
    split = min(room, HUGE_LEAVES)
    assert vm.stats()["page_tables"] == TABLES + split <= vm.table_budget
    assert kit.pages(vm) == (512 * split, HUGE_LEAVES - split, 0)
    # Every cleared page is write-protected, split or not: 4K leaves and the unsplit 2M ones.
    assert out["sptes_write_protected"] == 512 * split + (HUGE_LEAVES - split)
    kit.check(vm)


def test_a_write_into_a_leaf_the_budget_left_huge_faults_at_4k_and_is_logged() -> None:
    vm = huge_vm()
    shrink_budget(vm, TABLES + 2)
    kit.region(vm, 0, 0, HUGE_LEAVES * kit.M2, kit.HVA, kit.LOG_DIRTY)
    assert kit.leaf(vm, 3 * kit.M2) == kit.leaf(vm, 3 * kit.M2) is not None
    assert kit.leaf(vm, 3 * kit.M2)["level"] == 2 and kit.leaf(vm, 3 * kit.M2)["w"] is False
    shrink_budget(vm, 100)
    r = kit.access(vm, 3 * kit.M2 + kit.PAGE, kit.PAGE, "write")
    assert r["levels"] == {"4k": 1, "2m": 0, "1g": 0}
    log = vm.apply(parse("get_dirty_log", dict(slot=0)))
    assert log["dirty_count"] == 1
    kit.check(vm)


def test_enabling_logging_splits_a_1g_leaf_down_to_4k_leaves() -> None:
    """A 1G leaf (hugetlbfs at 1G) is split into 2M leaves, which are split in turn: 513
    tables, and every page write-protected at 4K."""
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("host_map", dict(userspace_addr=kit.HVA, len=kit.GB, page_size=kit.GB)))
    kit.region(vm, 0, kit.GB, kit.GB, kit.HVA)
    kit.access(vm, kit.GB, kit.PAGE, "write")
    assert kit.pages(vm) == (0, 0, 1)
    tables = vm.stats()["page_tables"]
    zap = kit.region(vm, 0, kit.GB, kit.GB, kit.HVA, kit.LOG_DIRTY)["zap"]
    assert zap["huge_pages_split"] == 1 + 512
    assert kit.pages(vm) == (512 * 512, 0, 0)
    assert vm.stats()["page_tables"] == tables + 1 + 512
    assert kit.leaf(vm, kit.GB + 5 * kit.M2)["w"] is False
    kit.check(vm)


def test_initially_set_clear_splits_only_the_leaf_under_the_bits_of_a_slot_not_at_gfn_0() -> None:
    base = 4 * kit.M2  # slot 0 = [8M, 16M): four 2M leaves, gfn 2048 on
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[3])))
    kit.hugepage(vm, kit.HVA, 4 * kit.M2)
    kit.region(vm, 0, base, 4 * kit.M2, kit.HVA)
    kit.access(vm, base, 4 * kit.M2, "write")
    kit.region(vm, 0, base, 4 * kit.M2, kit.HVA, kit.LOG_DIRTY)
    words = bytearray(SLOT_PAGES // 8)
    words[1024 // 8] = 1  # page 1024 of the slot: its third 2M leaf
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(
                slot=0,
                first_page=0,
                num_pages=SLOT_PAGES,
                bitmap=base64.b64encode(bytes(words)).decode(),
            ),
        )
    )
    assert out["cleared"] == 1
    assert kit.pages(vm) == (512, 3, 0)
    for k, level in enumerate((2, 2, 1, 2)):
        assert kit.leaf(vm, base + k * kit.M2)["level"] == level
    kit.check(vm)


def test_the_tables_reserved_for_a_split_are_the_tables_the_split_allocates() -> None:
    """split_tables_needed (what the service reserves before an eager split, as
    kvm_mmu_slot_try_split_huge_pages may allocate one table per 2M leaf and 1 + 512 per 1G
    leaf) over any range equals the tables split_huge then takes; 4K leaves and another
    address space need none."""
    vm = huge_vm()  # slot 0 = [0, 8M): four 2M leaves
    vm.apply(parse("host_map", dict(userspace_addr=kit.HVA + kit.GB, len=kit.GB, page_size=kit.GB)))
    kit.region(vm, 1, kit.GB, kit.GB, kit.HVA + kit.GB)
    kit.access(vm, kit.GB, kit.PAGE, "write")
    assert kit.pages(vm) == (0, HUGE_LEAVES, 1)
    g = kit.GB // kit.PAGE
    need = {
        (0, SLOT_PAGES): HUGE_LEAVES,
        (512, 1024): 1,
        (511, 513): 2,  # one page of each of two leaves
        (100, 101): 1,
        (g, 2 * g): 1 + 512,
        (0, 2 * g): HUGE_LEAVES + 1 + 512,
        (SLOT_PAGES, g): 0,  # nothing mapped in between
    }
    for (start, end), tables in need.items():
        assert split_tables_needed(vm, 0, start, end) == tables, (start, end)
    assert split_tables_needed(vm, 1, 0, 2 * g) == 0  # SMM's address space: no root
    before = vm.stats()["page_tables"]
    kit.region(vm, 0, 0, HUGE_LEAVES * kit.M2, kit.HVA, kit.LOG_DIRTY)
    assert vm.stats()["page_tables"] - before == HUGE_LEAVES
    assert split_tables_needed(vm, 0, 0, SLOT_PAGES) == 0  # all 4K now
    before = vm.stats()["page_tables"]
    kit.region(vm, 1, kit.GB, kit.GB, kit.HVA + kit.GB, kit.LOG_DIRTY)
    assert vm.stats()["page_tables"] - before == 1 + 512
    assert split_tables_needed(vm, 0, 0, 2 * g) == 0
    kit.check(vm)
