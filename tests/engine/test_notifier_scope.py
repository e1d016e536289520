"""What an MMU-notifier invalidation (MADV_DONTNEED or a hugetlbfs remap of the VMM's memory)
reaches: every memslot whose HVA range intersects, guest_memfd-only slots included (they are in
the HVA tree the notifier walks: kvm_replace_memslot, kvm_handle_hva_range); only the GFNs
behind the intersected HVAs; and only direct roots, never a TD's mirror root
(kvm-private-tdx.md §3.6)."""

from __future__ import annotations

from app.engine import Vm
from app.engine.ops import parse

from . import mmu as kit

MB, PAGE = kit.MB, kit.PAGE


def discard(vm: Vm, hva: int, n: int) -> dict:
    return vm.apply(parse("host_discard", dict(userspace_addr=hva, len=n)))


def gmem_only_vm() -> Vm:
    """A default VM whose slot 0 = [0, 4M) is guest_memfd-only (MMAP | INIT_SHARED), all
    mapped at 4K through the direct root."""
    vm = Vm.create(kit.DEFAULT, 1)
    fd = vm.apply(parse("create_guest_memfd", dict(size=4 * MB, flags=kit.MMAP | kit.INIT_SHARED)))
    kit.region(vm, 0, 0, 4 * MB, kit.HVA, kit.GMEM, guest_memfd=fd["fd"], guest_memfd_offset=0)
    kit.access(vm, 0, 4 * MB, "write")
    assert kit.pages(vm) == (1024, 0, 0)
    return vm


def test_madv_dontneed_on_a_gmem_only_slot_zaps_its_sptes_and_the_data_survives() -> None:
    vm = gmem_only_vm()
    vm.apply(parse("store", dict(vcpu=0, gpa=0x10, data="c0ffee")))
    z = discard(vm, kit.HVA, MB)["zap"]
    assert z is not None
    assert (z["cause"], z["path"]) == ("mmu_notifier", "zap_gfn_range")
    assert (z["gfn_start"], z["gfn_end"]) == (0, 256)
    assert z["sptes_zapped"]["direct"]["4k"] == 256 and z["sptes_zapped_total"] == 256
    assert z["tlb_flushes"] == 1
    assert kit.pages(vm) == (768, 0, 0)
    assert kit.leaf(vm, 0) is None and kit.leaf(vm, MB) is not None
    # The memory is guest_memfd's, not the VMA's: the guest refaults and reads its bytes.
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0x10, len=3))) == {"data": "c0ffee"}
    assert kit.leaf(vm, 0) is not None
    kit.check(vm)


def test_hugetlbfs_remap_over_a_gmem_only_slot_zaps_the_remapped_range() -> None:
    vm = gmem_only_vm()
    z = vm.apply(
        parse("host_map", dict(userspace_addr=kit.HVA + 2 * MB, len=2 * MB, page_size=kit.M2))
    )
    assert z["zap"] is not None
    assert (z["zap"]["gfn_start"], z["zap"]["gfn_end"]) == (512, 1024)
    assert z["zap"]["sptes_zapped_total"] == 512
    assert kit.pages(vm) == (512, 0, 0)
    assert vm.stats()["zaps_notifier"] == 1
    kit.check(vm)


def test_the_notifier_zaps_only_the_gfns_behind_the_intersected_hvas() -> None:
    """Two slots on disjoint HVA ranges, one slot's range partly discarded: the other slot and
    the rest of the first keep every leaf."""
    vm = Vm.create(kit.DEFAULT, 1)
    kit.region(vm, 0, 0, 2 * MB, kit.HVA)
    kit.region(vm, 1, 64 * MB, 2 * MB, kit.HVA + 2 * MB)
    kit.access(vm, 0, 2 * MB)
    kit.access(vm, 64 * MB, 2 * MB)
    z = discard(vm, kit.HVA + 2 * MB + 8 * PAGE, 4 * PAGE)["zap"]
    assert (z["gfn_start"], z["gfn_end"]) == (64 * MB // PAGE + 8, 64 * MB // PAGE + 12)
    assert z["sptes_zapped_total"] == 4
    assert kit.pages(vm) == (1024 - 4, 0, 0)
    assert kit.leaf(vm, 8 * PAGE) is not None  # slot 0 at the same offset: untouched
    assert kit.leaf(vm, 64 * MB + 7 * PAGE) is not None
    assert kit.leaf(vm, 64 * MB + 8 * PAGE) is None
    assert kit.leaf(vm, 64 * MB + 12 * PAGE) is not None
    kit.check(vm)


def test_the_notifier_never_touches_a_tds_mirror_root() -> None:
    """A TD's private pages live in guest_memfd and the mirror root: a discard of the slot's
    HVA range zaps its shared (direct) leaves and leaves the S-EPT alone (no PAGE.REMOVE)."""
    td, _fd = kit.td_with_gmem(2 * MB)
    kit.attrs(td, MB, MB, False)  # the upper half shared
    td.apply(parse("access", dict(vcpu=0, gpa=0, size=MB, access="write")))
    td.apply(parse("access", dict(vcpu=0, gpa=kit.S47 + MB, size=MB, access="write")))
    removes = td.tdx_state()["ops"][kit.REMOVE]
    before = td.stats()
    z = discard(td, kit.HVA, 2 * MB)["zap"]
    assert z["sptes_zapped"]["mirror"] == {"4k": 0, "2m": 0, "1g": 0}
    assert z["sptes_zapped"]["direct"]["4k"] == 256
    after = td.stats()
    assert after["pages_4k"] == before["pages_4k"] - 256
    assert kit.mirror_leaf_raw(td, 0)  # the private page is still in the mirror root
    assert td.tdx_state()["ops"][kit.REMOVE] == removes
    kit.check(td)
