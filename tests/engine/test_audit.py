"""The audit (app/engine/audit.py) finds each broken invariant it names: a healthy VM is
corrupted by hand, one invariant at a time, and that rule must be among those reported
(kvm-private-tdx.md §7)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from app.engine import Vm, spte
from app.engine.ops import parse
from app.engine.roots import Root

from .mmu import (
    DEFAULT,
    GMEM,
    HVA,
    LOG_DIRTY,
    M2,
    MB,
    PAGE,
    READONLY,
    SW_PROTECTED,
    TDX,
    access,
    attrs,
    check,
    hugepage,
    region,
)

SLOT_PAGES = 256  # slot 0 is [0, 1 MiB): entries 256… of its leaf table lie outside it


def root_of(vm: Vm) -> Root:
    (root,) = vm.mmu.roots_of()
    return root


def entry(vm: Vm, gfn: int) -> tuple[np.ndarray, int, int]:
    """(table entries, index, level) of the deepest entry over `gfn`."""
    table, i, level, _ = vm.mmu.lookup(root_of(vm), gfn)
    return vm.mmu.pool.entries(table), i, level


def small_vm() -> Vm:
    """Slot 0 over [0, 1 MiB), its first 16 pages written (4K leaves)."""
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, SLOT_PAGES * PAGE, HVA)
    access(vm, 0, 16 * PAGE, "write")
    check(vm)
    return vm


def huge_vm() -> Vm:
    """Slot 0 over [0, 4 MiB) on transparent huge pages, its first 2 MiB one writable leaf."""
    vm = Vm.create(DEFAULT, 1)
    hugepage(vm, HVA, 4 * MB)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0, PAGE, "write")
    assert entry(vm, 0)[2] == 2
    check(vm)
    return vm


def add_to_leaf(value: int, gfn: int = 0) -> Callable[[Vm], None]:
    def corrupt(vm: Vm) -> None:
        ent, i, _ = entry(vm, gfn)
        ent[i] = ent[i] + np.uint64(value)

    return corrupt


def clear_bits(bits: int) -> Callable[[Vm], None]:
    def corrupt(vm: Vm) -> None:
        ent, i, _ = entry(vm, 0)
        ent[i] = ent[i] & ~np.uint64(bits)

    return corrupt


def garbage_nonpresent(vm: Vm) -> None:
    ent, _, _ = entry(vm, 0)
    ent[300] = np.uint64(0x1234)  # neither SHADOW_NONPRESENT_VALUE nor an MMIO SPTE


def leaf_outside_slots(vm: Vm) -> None:
    ent, i, _ = entry(vm, 0)
    ent[SLOT_PAGES + 1] = ent[i]


def huge_root_entry(vm: Vm) -> None:
    root = root_of(vm)
    ent = vm.mmu.pool.entries(root.table)
    ent[0] = ent[0] | np.uint64(spte.EPT_PS)


def two_parents(vm: Vm) -> None:
    parent = _parent_of(vm, 0)
    ent = vm.mmu.pool.entries(parent)
    ent[1] = ent[0]  # the leaf table linked twice


def _parent_of(vm: Vm, gfn: int) -> int:
    """The level-2 table over `gfn`."""
    root = root_of(vm)
    at = vm.mmu.entry_at(root, gfn, 2)
    assert at is not None
    return at[0]


def dead_child(vm: Vm) -> None:
    table, _, _, _ = vm.mmu.lookup(root_of(vm), 0)
    vm.mmu.pool.release(table)


def slot_flag(flag: int) -> Callable[[Vm], None]:
    def corrupt(vm: Vm) -> None:
        slot = vm.spaces[0].find(0)
        assert slot is not None
        slot.flags |= flag  # set behind the engine's back: nothing was zapped or protected

    return corrupt


def slot_left_invalid(vm: Vm) -> None:
    slot = vm.spaces[0].find(0)
    assert slot is not None
    slot.invalid = True


def host_page_discarded(vm: Vm) -> None:
    vm.host.freed.add(HVA // PAGE + 3, HVA // PAGE + 4)  # no notifier ran: the leaf stays


def count(what: str) -> Callable[[Vm], None]:
    def corrupt(vm: Vm) -> None:
        if what == "root":
            root_of(vm).leaves[1] += 1
        else:
            vm.mmu.pages[1] += 1

    return corrupt


def leaked_table(vm: Vm) -> None:
    vm.mmu.pool.alloc(1, 1 << 30, root_of(vm).id)


CASES: list[tuple[Callable[[], Vm], Callable[[Vm], None], str]] = [
    (small_vm, garbage_nonpresent, "nonpresent_value"),
    (small_vm, clear_bits(spte.EPT_MMU_WRITABLE), "writable_chain"),
    (small_vm, clear_bits(spte.EPT_HOST_WRITABLE), "writable_chain"),
    (small_vm, add_to_leaf(1 << spte.PFN_SHIFT), "shared_pfn_matches_hva"),
    (small_vm, leaf_outside_slots, "leaf_in_live_memslot"),
    (small_vm, huge_root_entry, "leaf_level"),
    (small_vm, two_parents, "table_shared"),
    (small_vm, dead_child, "nonleaf_points_to_live_table"),
    (small_vm, count("root"), "root_counts"),
    (small_vm, count("stats"), "stats_match_leaves"),
    (small_vm, leaked_table, "no_leaked_tables"),
    (small_vm, slot_flag(READONLY), "readonly_slot"),
    (small_vm, slot_left_invalid, "slot_invalid"),
    (small_vm, host_page_discarded, "no_freed_page_mapped"),
    (huge_vm, add_to_leaf(1 << spte.PFN_SHIFT), "huge_pfn_aligned"),
    (huge_vm, slot_flag(LOG_DIRTY), "no_huge_while_logging"),
]


@pytest.mark.parametrize(("build", "corrupt", "rule"), CASES, ids=[c[2] for c in CASES])
def test_each_rule_reports_its_own_breakage(
    build: Callable[[], Vm], corrupt: Callable[[Vm], None], rule: str
) -> None:
    vm = build()
    corrupt(vm)
    a = vm.audit()
    assert not a["ok"] and rule in {v["rule"] for v in a["violations"]}, a["violations"]


def test_a_write_protected_leaf_is_no_violation() -> None:
    """W cleared with MMU-writable kept is dirty logging's write-protection, not a break."""
    vm = small_vm()
    clear_bits(spte.EPT_W)(vm)
    assert vm.audit()["ok"]


def sw_protected_vm() -> Vm:
    """SW_PROTECTED: slot 0 over [0, 4 MiB) bound to a guest_memfd; page 0 private and
    mapped, page 8 shared and mapped."""
    vm = Vm.create(SW_PROTECTED, 1)
    fd = vm.apply(parse("create_guest_memfd", {"size": 4 * MB, "flags": 0}))["fd"]
    region(vm, 0, 0, 4 * MB, HVA, GMEM, guest_memfd=fd, guest_memfd_offset=0)
    attrs(vm, 0, PAGE, True)
    access(vm, 0, PAGE, "write")
    access(vm, 8 * PAGE, PAGE, "write")
    check(vm)
    return vm


def test_a_private_leaf_on_a_shared_gfn_and_a_shared_leaf_on_a_private_one() -> None:
    vm = sw_protected_vm()
    vm.attrs.private.remove(0, 1)  # attributes flipped without the zap KVM does
    vm.attrs.private.add(8, 9)
    found = {v["rule"] for v in vm.audit()["violations"]}
    assert {"private_leaf_attribute", "shared_leaf_attribute"} <= found


def test_a_private_leaf_mapping_another_file_page() -> None:
    vm = sw_protected_vm()
    add_to_leaf(1 << spte.PFN_SHIFT)(vm)
    found = {v["rule"] for v in vm.audit()["violations"]}
    assert found & {"gmem_pfn_matches_binding", "no_freed_page_mapped"}, found


def test_blocked_sept_pages_left_behind() -> None:
    vm = Vm.create(TDX, 1)
    assert vm.tdx is not None and vm.audit()["ok"]
    vm.tdx.blocked.add(0, 1)
    assert "sept_blocked" in {v["rule"] for v in vm.audit()["violations"]}


def test_the_audit_counts_what_it_checked() -> None:
    vm = huge_vm()
    access(vm, M2, 3 * PAGE, "write")  # 2 MiB leaves from THP: a second huge leaf
    a = vm.audit()
    assert a["ok"] and a["checked"]["leaves"] == {"4k": 0, "2m": 2, "1g": 0}
    assert a["checked"]["tables"] == vm.mmu.pool.live
