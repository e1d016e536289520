"""A fault under a huge leaf it may not use splits the leaf (engine revision 2).

arch/x86/kvm/mmu/tdp_mmu.c kvm_tdp_mmu_map: walking down to the goal level, a present huge
leaf above it is replaced by a table of 512 smaller leaves with its attributes
(tdp_mmu_split_huge_page, make_small_spte), never zapped; then
tdp_mmu_map_handle_target_level handles the faulting page. Two faults get there:
- a write to a huge leaf write-protected for dirty logging without eager page splitting
  (kvm_mmu_hugepage_adjust gives a dirty-logged slot 4K; fast_page_fault declines huge
  leaves of dirty-logged slots): the faulting page gets a writable SPTE (RET_PF_FIXED), the
  other 511 keep their read-only mapping, and later writes take the fast path;
- an exec fault under nx_huge_pages (disallowed_hugepage_adjust): make_small_spte makes the
  4K children executable, so the faulting page is RET_PF_SPURIOUS.
Engine revision 1 (VMs journaled before revisions) zapped the leaf; it still replays so.
"""

from __future__ import annotations

import errno

import pytest

from app.engine import Vm, codec, spte
from app.engine.ops import parse
from app.engine.revision import ENGINE_REVS
from app.engine.trace import Kind
from tests.engine import mmu as kit
from tests.engine.mmu import HVA, LOG_DIRTY, PAGE

MB = 1 << 20


def thp_vm(host: dict, engine_rev: int = 2) -> Vm:
    vm = Vm.create(kit.DEFAULT, 1, host=host, engine_rev=engine_rev)
    kit.hugepage(vm, HVA, 4 * MB)
    kit.region(vm, 0, 0, 4 * MB, HVA)
    return vm


def logged_huge_vm(engine_rev: int = 2) -> Vm:
    """[0, 4 MiB) mapped by two 2M leaves, write-protected by dirty logging (no eager split)."""
    vm = thp_vm({"eager_page_split": False}, engine_rev)
    kit.access(vm, 0, 4 * MB, "write")
    kit.region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)
    assert kit.pages(vm) == (0, 2, 0)
    return vm


def test_a_write_splits_the_protected_huge_leaf_and_keeps_its_translations() -> None:
    vm = logged_huge_vm()
    events = len(vm.events)
    before = vm.stats()
    out = kit.access(vm, 0x5000, PAGE, "write")
    s = vm.stats()
    # One leaf fixed at 4K; the other 511 pages of the 2M stay mapped (read-only).
    assert out["levels"] == {"4k": 1, "2m": 0, "1g": 0} and out["refaults"] == 0
    assert kit.pages(vm) == (512, 1, 0)
    assert s["pf_fixed"] - before["pf_fixed"] == 1 and s["pf_taken"] - before["pf_taken"] == 1
    assert s["page_tables"] == before["page_tables"] + 1
    assert len(vm.events) == events  # nothing was zapped
    assert kit.leaf(vm, 0x5000)["w"] and not kit.leaf(vm, 0x6000)["w"]
    assert kit.leaf(vm, 0x6000)["pfn"] == kit.leaf(vm, 0x5000)["pfn"] + 1
    assert vm.apply(parse("get_dirty_log", {"slot": 0}))["dirty_count"] == 1
    kit.check(vm)


def test_later_writes_into_the_split_leaf_take_the_fast_path() -> None:
    vm = logged_huge_vm()
    kit.access(vm, 0, PAGE, "write")
    before = vm.stats()
    out = kit.access(vm, PAGE, 3 * PAGE, "write")
    s = vm.stats()
    assert out["levels"]["4k"] == 0 and out["write_protect_fixed"] == 3
    assert s["pf_fast"] - before["pf_fast"] == 3 and s["pf_fixed"] == before["pf_fixed"]
    assert vm.apply(parse("get_dirty_log", {"slot": 0}))["dirty_count"] == 4
    kit.check(vm)


def test_a_run_across_the_leaf_fixes_its_first_page_slowly_and_the_rest_fast() -> None:
    vm = logged_huge_vm()
    before = vm.stats()
    out = kit.access(vm, 2 * MB - 2 * PAGE, 4 * PAGE, "write")
    s = vm.stats()
    # Each 2M leaf is split by its first written page: two slow fixes, two fast ones.
    assert kit.pages(vm) == (1024, 0, 0)
    assert s["pf_fixed"] - before["pf_fixed"] == 2 and s["pf_fast"] - before["pf_fast"] == 2
    assert out["levels"]["4k"] == 2 and out["pages"] == 4
    kit.check(vm)


def test_the_split_is_traced_as_the_kernel_traces_it() -> None:
    vm = logged_huge_vm()
    mark = vm.mmu.trace.written
    kit.access(vm, 0x3000, PAGE, "write")
    recs = vm.mmu.trace.records(after=mark)
    kinds = [Kind(int(k)) for k in recs["kind"]]
    # kvm_mmu_spte_requested, the link replacing the huge leaf, kvm_mmu_split_huge_page, the
    # faulting child made writable, kvm_mmu_set_spte.
    assert kinds == [
        Kind.SPTE_REQUESTED,
        Kind.SPTE_CHANGED,
        Kind.SPLIT_HUGE_PAGE,
        Kind.SPTE_CHANGED,
        Kind.SET_SPTE,
    ]
    link, child = recs[1], recs[3]
    assert int(link["level"]) == 2 and int(link["a"]) & spte.EPT_PS
    assert not int(link["b"]) & spte.EPT_PS
    assert int(child["level"]) == 1 and int(child["b"]) & ~int(child["a"]) == spte.EPT_W


def test_revision_1_still_zaps_the_leaf() -> None:
    vm = logged_huge_vm(engine_rev=1)
    out = kit.access(vm, 0x5000, PAGE, "write")
    assert out["levels"]["4k"] == 1
    assert kit.pages(vm) == (1, 1, 0)  # the rest of the 2M is gone
    assert kit.leaf(vm, 0x6000) is None
    kit.check(vm)


def test_an_exec_fault_under_nx_huge_pages_splits_into_executable_leaves() -> None:
    vm = thp_vm({"nx_huge_pages": True})
    kit.access(vm, 0, 2 * MB, "read")
    assert not kit.leaf(vm, 0)["x"]  # make_spte: huge leaves are NX under the mitigation
    before = vm.stats()
    out = kit.access(vm, 0x7000, PAGE, "exec")
    s = vm.stats()
    # make_small_spte: the 4K children are executable, so the fault is spurious once split.
    assert out["levels"] == {"4k": 0, "2m": 0, "1g": 0}
    assert kit.pages(vm) == (512, 0, 0)
    assert all(kit.leaf(vm, gpa)["x"] for gpa in (0, 0x7000, 2 * MB - PAGE))
    assert s["pf_taken"] - before["pf_taken"] == 1 and s["pf_fixed"] == before["pf_fixed"]
    # track_possible_nx_huge_page: the split table is a recovery candidate.
    assert s["nx_lpage_splits"] == 1
    rec = vm.apply(parse("recover_nx_huge_pages", {"ratio": 1}))
    assert rec["recovered"] == 1 and kit.pages(vm) == (0, 0, 0)
    kit.check(vm)


@pytest.mark.parametrize("rev", [1, 2])
def test_the_revision_survives_a_snapshot(rev: int) -> None:
    vm = logged_huge_vm(engine_rev=rev)
    back = codec.loads(codec.dumps(vm))
    assert back.engine_rev == rev
    kit.access(back, 0x5000, PAGE, "write")
    kit.access(vm, 0x5000, PAGE, "write")
    assert codec.digest(back) == codec.digest(vm)


def test_an_unknown_revision_is_refused() -> None:
    with pytest.raises(Exception) as e:
        Vm.create(0, 1, engine_rev=max(ENGINE_REVS) + 1)
    assert getattr(e.value, "errno", None) == errno.EINVAL
