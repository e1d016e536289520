"""When a zap flushes remote TLBs and whom it kicks (kvm-memslots.md §4.3, §4.4, §7): a
targeted zap flushes once if and only if a leaf left a valid root, and that flush IPIs every
vCPU inside the guest (`vcpu_kicks`, `remote_tlb_flush`) while it always counts a request
(`remote_tlb_flush_requests`); a fast zap flushes nothing and sends every running vCPU
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, mapped or not."""

from __future__ import annotations

import pytest

from app.engine import Vm
from app.engine.ops import parse

from . import mmu as kit

MB, PAGE = kit.MB, kit.PAGE


def vm_with(vcpus_running: int, quirk: bool = True) -> Vm:
    """Three vCPUs; slot 0 = [0, 4M); the first `vcpus_running` vCPUs each wrote one page of
    its first MiB (so they are in the guest); the upper 3 MiB is never touched."""
    vm = Vm.create(kit.DEFAULT, 3)
    if not quirk:
        vm.apply(
            parse("enable_cap", dict(cap=kit.DISABLE_QUIRKS2, flags=0, args=[kit.SLOT_ZAP_ALL]))
        )
    kit.region(vm, 0, 0, 4 * MB, kit.HVA)
    kit.region(vm, 1, 64 * MB, MB, kit.HVA + 64 * MB)
    for v in range(vcpus_running):
        vm.apply(parse("access", dict(vcpu=v, gpa=v * PAGE, size=PAGE, access="write")))
    return vm


def flush_stats(vm: Vm) -> tuple[int, int]:
    s = vm.stats()
    return s["remote_tlb_flush_requests"], s["remote_tlb_flush"]


def discard(vm: Vm, hva: int, n: int) -> dict:
    zap = vm.apply(parse("host_discard", dict(userspace_addr=hva, len=n)))["zap"]
    assert zap is not None
    return zap  # type: ignore[no-any-return]


@pytest.mark.parametrize("running", [0, 1, 2, 3])
def test_a_notifier_zap_that_removed_a_leaf_flushes_once_and_kicks_every_running_vcpu(
    running: int,
) -> None:
    vm = vm_with(running)
    kit.access(vm, 0, MB)  # vCPU 0 maps the first MiB (and is running from here on)
    running = max(running, 1)
    before = flush_stats(vm)
    z = discard(vm, kit.HVA, 8 * PAGE)
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (1, running)
    assert flush_stats(vm) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("running", [0, 2])
def test_a_notifier_zap_that_removed_nothing_neither_flushes_nor_kicks(running: int) -> None:
    vm = vm_with(running)
    before = flush_stats(vm)
    z = discard(vm, kit.HVA + 2 * MB, MB)  # slot memory, never faulted
    assert z["sptes_zapped_total"] == 0
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (0, 0)
    assert flush_stats(vm) == before


@pytest.mark.parametrize("mapped", [False, True])
def test_deleting_a_slot_without_the_quirk_flushes_only_if_it_had_leaves(mapped: bool) -> None:
    vm = vm_with(2, quirk=False)
    if mapped:
        kit.access(vm, 64 * MB, MB)
    before = flush_stats(vm)
    z = kit.region(vm, 1, 0, 0, 0)["zap"]
    assert z["path"] == "zap_slot_leafs"
    assert z["tlb_flushes"] == int(mapped)
    assert z["vcpu_kicks"] == (2 if mapped else 0)
    assert flush_stats(vm) == (before[0] + int(mapped), before[1] + int(mapped))


@pytest.mark.parametrize("running", [0, 1, 3])
def test_a_fast_zap_kicks_every_running_vcpu_without_a_remote_flush(running: int) -> None:
    vm = vm_with(running)
    before = flush_stats(vm)
    z = kit.region(vm, 1, 0, 0, 0)["zap"]  # slot 1 never mapped: the quirk zaps everything
    assert z["path"] == "zap_all_fast"
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (0, running)
    assert flush_stats(vm) == before


def test_a_flush_with_no_vcpu_in_the_guest_is_a_request_without_an_ipi() -> None:
    vm = vm_with(0, quirk=False)
    vm.apply(parse("pre_fault", dict(vcpu=0, gpa=64 * MB, size=MB)))  # maps, runs nobody
    z = kit.region(vm, 1, 0, 0, 0)["zap"]
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (1, 0)
    assert flush_stats(vm) == (1, 0)


def test_a_guest_memfd_punch_flushes_only_when_it_removed_a_mapping() -> None:
    td, fd = kit.td_with_gmem(2 * MB)
    td.apply(parse("access", dict(vcpu=0, gpa=0, size=PAGE, access="write")))
    before = flush_stats(td)
    punch = dict(fd=fd, mode=3, offset=MB, len=MB)  # KEEP_SIZE | PUNCH_HOLE, unmapped half
    z = td.apply(parse("gmem_fallocate", punch))["zap"]
    assert z["sptes_zapped_total"] == 0
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (0, 0)
    assert flush_stats(td) == before
    punch = dict(fd=fd, mode=3, offset=0, len=PAGE)
    z = td.apply(parse("gmem_fallocate", punch))["zap"]
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (1, 1)
    assert flush_stats(td) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("running", [1, 3])
def test_enabling_dirty_logging_flushes_and_kicks_even_with_nothing_to_protect(
    running: int,
) -> None:
    """kvm_arch_commit_memory_region flushes the slot's TLB entries whenever a FLAGS_ONLY
    change turns LOG_DIRTY_PAGES on (kvm_mmu_slot_apply_flags, §3.4 d), even when no leaf
    was split or write-protected: here slot 1, which no vCPU ever touched."""
    vm = vm_with(running)
    before = flush_stats(vm)
    z = kit.region(vm, 1, 64 * MB, MB, kit.HVA + 64 * MB, kit.LOG_DIRTY)["zap"]
    assert (z["huge_pages_split"], z["sptes_write_protected"]) == (0, 0)
    assert (z["tlb_flushes"], z["vcpu_kicks"]) == (1, running)
    assert flush_stats(vm) == (before[0] + 1, before[1] + 1)
