"""Re-arming dirty logging after GET_DIRTY_LOG / CLEAR_DIRTY_LOG (dirty.rearm, engine
revision 3): kvm_arch_mmu_enable_log_dirty_pt_masked write-protects, with
KVM_DIRTY_LOG_INITIALLY_SET, the huge leaves over each 64-page word's first and last page
(kvm_mmu_slot_gfn_write_protect at PG_LEVEL_2M: W and MMU-writable go), then handles the
masked 4K leaves only (kvm_tdp_mmu_clear_dirty_pt_masked skips every leaf above 4K)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from app.engine import Vm
from app.engine.dirty import _word_ends, protect_huge_gfn
from app.engine.ops import parse
from app.engine.spte import EPT_MMU_WRITABLE, EPT_W
from app.engine.trace import Kind
from tests.engine import mmu as kit
from tests.engine.mmu import HVA, LOG_DIRTY

MB = 1 << 20


def _ends_model(mask: list[bool], base: int) -> list[int]:
    """The kernel's loop, page by page: per word with bits, its first set page, and its last
    when ALIGN(first, 2 MiB) != ALIGN(last, 2 MiB) (ALIGN rounds up)."""
    out = []
    for w in range(0, len(mask), 64):
        pages = [w + i for i in range(64) if w + i < len(mask) and mask[w + i]]
        if not pages:
            continue
        a, b = base + pages[0], base + pages[-1]
        out.append(a)
        if (a + 511) // 512 != (b + 511) // 512:
            out.append(b)
    return out


@pytest.mark.parametrize("base", [0, 1, 448, 512, 1000])
@pytest.mark.parametrize("npages", [1, 63, 64, 200, 1024, 1100])
def test_word_ends_are_the_kernels_start_and_end_per_word(base: int, npages: int) -> None:
    rng = np.random.default_rng(npages * 7919 + base)
    for density in (0.02, 0.3, 1.0):
        mask = rng.random(npages) < density
        assert _word_ends(mask, base) == _ends_model(mask.tolist(), base), density
    # One set page per word, an aligned start with its end in the same 2 MiB region, and a
    # word crossing a 2 MiB boundary.
    mask = np.zeros(npages, dtype=bool)
    mask[::64] = True
    assert _word_ends(mask, base) == _ends_model(mask.tolist(), base)
    mask[63::64] = True
    assert _word_ends(mask, base) == _ends_model(mask.tolist(), base)


def thp_vm(pml: bool, manual: int, huge: int = 1) -> Vm:
    """Slot 0 over [0, 4 MiB) on THP, its first `huge` 2 MiB regions writable leaves mapped
    before dirty logging began with `manual` (INITIALLY_SET keeps them whole), eager split
    off."""
    vm = Vm.create(kit.DEFAULT, 1, host={"enable_pml": pml, "eager_page_split": False})
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[manual])))
    kit.hugepage(vm, HVA, 4 * MB)
    kit.region(vm, 0, 0, 4 * MB, HVA)
    kit.access(vm, 0, huge * 2 * MB, "write")
    kit.region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)
    assert kit.pages(vm) == (0, huge, 0)
    return vm


def test_protect_huge_gfn_takes_w_and_mmu_writable_once_and_traces_the_leaf_head() -> None:
    vm = thp_vm(pml=False, manual=3)
    (root,) = vm.mmu.roots_of()
    old = int(kit.last_entry(vm, 0)["raw"], 16)
    mark = vm.mmu.trace.written
    assert protect_huge_gfn(vm, root, 301) == 1  # a page inside the leaf, not its head
    leaf = kit.last_entry(vm, 0)
    assert (leaf["level"], leaf["w"], leaf["mmu_writable"]) == (2, False, False)
    rec = vm.mmu.trace.records(after=mark)
    assert len(rec) == 1 and Kind(int(rec["kind"][0])) is Kind.SPTE_CHANGED
    assert (int(rec["as_id"][0]), int(rec["gfn"][0]), int(rec["level"][0])) == (0, 0, 2)
    assert (int(rec["a"][0]), int(rec["b"][0])) == (old, old & ~(EPT_W | EPT_MMU_WRITABLE))
    assert protect_huge_gfn(vm, root, 0) == 0  # already protected: nothing changes
    assert vm.mmu.trace.written == mark + 1
    kit.access(vm, 2 * MB, kit.PAGE, "write")  # a 4K leaf: left alone
    assert protect_huge_gfn(vm, root, 512) == 0 and kit.last_entry(vm, 2 * MB)["w"]
    assert protect_huge_gfn(vm, root, 1 << 20) == 0  # nothing mapped there


@pytest.mark.parametrize("rev", [2, 3])
def test_get_dirty_log_without_initially_set_write_protects_4k_leaves_only(rev: int) -> None:
    """Manual protect turned off after INITIALLY_SET enabled logging (legal at any time): a
    GET_DIRTY_LOG re-arms with the harvested bits and no INITIALLY_SET, so the 2M leaf is
    only in the masked pass, which passes over leaves above 4K (revision 3); revision 2
    write-protected a huge leaf whose first page's bit was set."""
    vm = thp_vm(pml=False, manual=3)
    vm.set_engine_rev(rev)
    kit.access(vm, 2 * MB, 8 * kit.PAGE, "write")  # 4K leaves, logged
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[0])))
    log = vm.apply(parse("get_dirty_log", {"slot": 0}))
    huge = kit.last_entry(vm, 0)
    if rev == 3:
        assert log["sptes_write_protected"] == 8 and huge["w"]
    else:
        assert log["sptes_write_protected"] == 9 and not huge["w"]
    assert huge["mmu_writable"]
    assert not any(kit.last_entry(vm, 2 * MB + p * kit.PAGE)["w"] for p in range(8))
    kit.check(vm)


@pytest.mark.parametrize("pml", [False, True])
def test_clear_dirty_log_protects_each_huge_leaf_its_words_touch(pml: bool) -> None:
    """Bits in the second 2 MiB region only, and one word whose first page is the region's
    last: the huge leaf of the first region is write-protected by the word whose last page
    lies in it, not by its own first page's bit."""
    vm = thp_vm(pml=pml, manual=3, huge=2)
    bits = [448 + 63, 512 + 5]  # word 7 (pages 448-511): its last page; word 8: page 517
    words = [0] * 16
    for b in bits:
        words[b // 64] |= 1 << (b % 64)
    bitmap = base64.b64encode(b"".join(w.to_bytes(8, "little") for w in words))
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=1024, bitmap=bitmap.decode()),
        )
    )
    assert out == {"cleared": 2, "sptes_write_protected": 2}
    for gpa in (0, 2 * MB):
        leaf = kit.last_entry(vm, gpa)
        assert (leaf["level"], leaf["w"], leaf["mmu_writable"]) == (2, False, False)
    kit.access(vm, 2 * MB + 9 * kit.PAGE, 8, "write")  # faults, splits, logged
    log = vm.apply(parse("get_dirty_log", {"slot": 0}))
    assert 512 + 9 in kit.dirty_bits_set(log) and kit.pages(vm)[1] == 1
    kit.check(vm)


def test_pml_enabling_logging_clears_d_on_huge_leaves_too_without_tracing_it() -> None:
    """kvm_mmu_slot_apply_flags with PML: kvm_tdp_mmu_clear_dirty_slot clears D on every leaf
    of the slot, huge ones included, with tdp_mmu_clear_spte_bits (no handle_changed_spte,
    so no kvm_tdp_mmu_spte_changed); the huge leaf is write-protected too, and that change is
    traced. The masked re-arm clears D on 4K leaves only."""
    vm = Vm.create(kit.DEFAULT, 1, host={"enable_pml": True, "eager_page_split": False})
    kit.hugepage(vm, HVA, 4 * MB)
    kit.region(vm, 0, 0, 4 * MB, HVA)
    kit.access(vm, 0, 2 * MB, "write")
    assert kit.last_entry(vm, 0)["dirty"]
    mark = vm.mmu.trace.written
    kit.region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)
    leaf = kit.last_entry(vm, 0)
    assert (leaf["level"], leaf["dirty"], leaf["w"]) == (2, False, False)
    rec = vm.mmu.trace.records(after=mark)
    assert [Kind(int(k)) for k in rec["kind"]] == [Kind.SPTE_CHANGED]
    assert int(rec["a"][0]) & EPT_W and not int(rec["b"][0]) & EPT_W  # the write-protect
