"""Private memory on the engine: memory attributes, private faults and guest_memfd (issue 4).

Kernel behaviour per kvm-private-tdx.md §2.3.1 (faults), §3 (attributes) and §4 (guest_memfd),
mostly on KVM_X86_SW_PROTECTED_VM, where private and shared SPTEs share the single direct root.
TD-specific rules (mirror root, S-EPT, accept) are in test_tdx.py. Every scenario ends with a
clean `audit`.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse
from tests.engine import mmu as kit
from tests.engine.mmu import apply_json

SW_PROT, TDX, DEFAULT = 1, 5, 0
PRIVATE = 8  # KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = 4  # KVM_MEM_GUEST_MEMFD
PAGE = 4096
MB = 1 << 20
HVA = 0x7F00_0000_0000
S47 = 1 << 47
MEMORY_FAULT = "KVM_EXIT_MEMORY_FAULT"
MMIO = "KVM_EXIT_MMIO"


# -- helpers -----------------------------------------------------------------------------------
def gmem_vm(
    vm_type: int = SW_PROT, size: int = 8 * MB, gpa: int = 0, huge_host: bool = False
) -> tuple[Vm, int]:
    """A VM with guest_memfd-bound slot 0 of `size` bytes at `gpa` (HVA backs the shared half)."""
    vm = Vm.create(vm_type, 1)
    fd = vm.apply(parse("create_guest_memfd", {"size": size, "flags": 0}))["fd"]
    if huge_host:
        vm.apply(parse("host_map", {"userspace_addr": HVA, "len": size, "page_size": 2 * MB}))
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": GMEM,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": HVA,
                "guest_memfd": fd,
                "guest_memfd_offset": 0,
            },
        ),
    )
    return vm, fd


def plain_slot(vm: Vm, slot: int, gpa: int, size: int, hva: int) -> None:
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": slot,
                "flags": 0,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": hva,
            },
        ),
    )


def attrs(vm: Vm, address: int, size: int, private: bool) -> dict[str, Any]:
    return vm.apply(
        parse(
            "set_memory_attributes",
            {"address": address, "size": size, "attributes": PRIVATE if private else 0, "flags": 0},
        ),
    )


def access(vm: Vm, gpa: int, size: int = PAGE, kind: str = "read") -> dict[str, Any]:
    return vm.apply(parse("access", {"vcpu": 0, "gpa": gpa, "size": size, "access": kind}))


def load(vm: Vm, gpa: int, n: int) -> dict[str, Any]:
    return vm.apply(parse("load", {"vcpu": 0, "gpa": gpa, "len": n}))


def store(vm: Vm, gpa: int, data: bytes) -> dict[str, Any]:
    return vm.apply(parse("store", {"vcpu": 0, "gpa": gpa, "data": data.hex()}))


def mapped(vm: Vm, slot: int = 0) -> dict[str, int]:
    return vm.memslot(slot)["mapped"]


def assert_clean(vm: Vm) -> None:
    report = vm.audit()
    assert report["ok"], report["violations"]


def expect_errno(err: int, fn, *args: Any) -> KvmError:  # type: ignore[no-untyped-def]
    with pytest.raises(KvmError) as info:
        fn(*args)
    assert info.value.errno == err, info.value
    return info.value


def mem_fault(gpa: int, private: bool, size: int = PAGE) -> dict[str, Any]:
    return {"reason": MEMORY_FAULT, "gpa": gpa, "size": size, "flags": PRIVATE if private else 0}


# -- attributes: conversions zap the view being left -------------------------------------------
def test_to_private_zaps_the_shared_mapping_with_cause_attributes() -> None:
    vm, _ = gmem_vm()
    access(vm, PAGE)  # gfn 1, shared (host 4K pages: a 4K leaf)
    access(vm, 600 * PAGE)  # another 2 MiB region of the same slot
    assert mapped(vm) == {"shared": 2, "private": 0, "total": 2}
    zap = attrs(vm, PAGE, PAGE, True)["zap"]
    assert zap["cause"] == "attributes"
    assert zap["sptes_zapped_total"] == 1
    assert zap["sptes_zapped"]["4k"] == 1
    # mmu.c (kvm_arch_pre_set_memory_attributes): the unmap is the changed range itself; the
    # head/tail huge regions only join the in-progress invalidation (§3.4 over-states it).
    assert (zap["gfn_start"], zap["gfn_end"]) == (1, 2)
    assert zap["tlb_flushes"] == 1
    assert vm.zap_events()[0]["seq"] == zap["seq"]
    assert mapped(vm) == {"shared": 1, "private": 0, "total": 1}  # gfn 600 untouched
    res = access(vm, PAGE)
    assert res["exit"] is None and res["mapped"] == 1
    assert mapped(vm) == {"shared": 1, "private": 1, "total": 2}
    assert_clean(vm)


def test_to_shared_zaps_the_private_mapping() -> None:
    vm, _ = gmem_vm()
    attrs(vm, 0, 4 * MB, True)
    access(vm, 0, 2 * PAGE, "write")
    access(vm, 600 * PAGE, 2 * PAGE, "write")  # another 2 MiB region
    assert mapped(vm) == {"shared": 0, "private": 4, "total": 4}
    zap = attrs(vm, 0, 2 * PAGE, False)["zap"]
    assert zap["cause"] == "attributes"
    assert zap["sptes_zapped_total"] == 2
    assert mapped(vm) == {"shared": 0, "private": 2, "total": 2}
    access(vm, 0, 2 * PAGE)
    assert mapped(vm) == {"shared": 2, "private": 2, "total": 4}
    assert_clean(vm)


def test_conversion_zaps_a_huge_shared_leaf_straddling_the_range() -> None:
    vm, _ = gmem_vm(huge_host=True)
    res = access(vm, 0, 8 * MB, "write")
    assert res["levels"] == {"4k": 0, "2m": 4, "1g": 0}
    zap = attrs(vm, PAGE, PAGE, True)["zap"]
    assert zap["sptes_zapped"]["2m"] == 1 and zap["sptes_zapped_total"] == 1
    assert vm.stats()["pages_2m"] == 3
    # The region is now mixed: it is rebuilt from 4K leaves, gfn 1 from the guest_memfd.
    res = access(vm, 0, 2 * MB, "write")
    assert res["exit"] is None
    assert res["levels"] == {"4k": 512, "2m": 0, "1g": 0}
    assert mapped(vm) == {"shared": 2047, "private": 1, "total": 2048}
    assert_clean(vm)


def test_widening_stays_inside_the_slot() -> None:
    """Two 1 MiB slots share one 2 MiB region: it lies in neither slot, so nothing widens and
    the neighbour slot keeps its mappings (§3.4)."""
    vm = Vm.create(SW_PROT, 1)
    plain_slot(vm, 0, 0, MB, HVA)
    plain_slot(vm, 1, MB, MB, HVA + 16 * MB)
    access(vm, 0, 2 * MB)
    assert mapped(vm, 0)["shared"] == 256 and mapped(vm, 1)["shared"] == 256
    zap = attrs(vm, 0, PAGE, True)["zap"]
    assert zap["sptes_zapped_total"] == 1
    assert (zap["gfn_start"], zap["gfn_end"]) == (0, 1)
    assert mapped(vm, 0)["shared"] == 255
    assert mapped(vm, 1)["shared"] == 256
    assert_clean(vm)


def test_identical_attributes_are_a_no_op() -> None:
    vm, _ = gmem_vm()
    attrs(vm, 0, 16 * PAGE, True)
    access(vm, 0, 16 * PAGE)
    events = len(vm.zap_events())
    flushes = vm.stats()["remote_tlb_flush_requests"]
    assert attrs(vm, 0, 16 * PAGE, True) == {"zap": None, "changed": False}
    assert attrs(vm, 64 * PAGE, PAGE, False) == {"zap": None, "changed": False}  # already shared
    assert len(vm.zap_events()) == events
    assert vm.stats()["remote_tlb_flush_requests"] == flushes
    assert mapped(vm)["private"] == 16
    assert_clean(vm)


def test_attributes_may_lie_outside_memslots() -> None:
    vm, _ = gmem_vm()
    res = attrs(vm, 512 * MB, 2 * MB, True)
    assert res["changed"] is True and res["zap"] is None
    assert vm.memory_attributes() == [{"address": 512 * MB, "size": 2 * MB, "attributes": PRIVATE}]
    assert_clean(vm)


def test_private_to_shared_keeps_the_host_view() -> None:
    """The shared view reads host memory, the private view the guest_memfd; a conversion moves
    the guest between them and touches neither (§3.5: conversion never frees or copies)."""
    vm, fd = gmem_vm()
    vm.apply(parse("host_write", {"userspace_addr": HVA, "data": (b"\x11" * 8).hex()}))
    assert load(vm, 0, 8) == {"data": (b"\x11" * 8).hex()}
    store(vm, 8, b"\x22" * 8)  # shared store: lands in host memory
    host_before = vm.host_read(HVA, 16)["data"]
    assert host_before == (b"\x11" * 8 + b"\x22" * 8).hex()

    attrs(vm, 0, PAGE, True)
    assert load(vm, 0, 16) == {"data": bytes(16).hex()}  # a fresh guest_memfd page
    store(vm, 0, b"\x33" * 8)
    assert load(vm, 0, 16) == {"data": (b"\x33" * 8 + bytes(8)).hex()}
    assert vm.host_read(HVA, 16)["data"] == host_before  # host memory untouched

    zap = attrs(vm, 0, PAGE, False)["zap"]
    assert zap["sptes_zapped_total"] == 1
    assert load(vm, 0, 16) == {"data": host_before}  # guest's shared view = host bytes
    assert vm.host_read(HVA, 16)["data"] == host_before

    attrs(vm, 0, PAGE, True)  # back: the guest_memfd page was never punched
    assert load(vm, 0, 16) == {"data": (b"\x33" * 8 + bytes(8)).hex()}
    assert vm.guest_memfds()[0]["allocated_pages"] == 1
    assert_clean(vm)
    del fd


# -- faults ------------------------------------------------------------------------------------
def test_private_access_to_a_slot_without_guest_memfd_is_a_memory_fault_not_mmio() -> None:
    vm = Vm.create(SW_PROT, 1)
    plain_slot(vm, 0, 64 * MB, MB, HVA)
    attrs(vm, 64 * MB, PAGE, True)
    mmio_before = vm.stats()["mmio_sptes"]
    res = access(vm, 64 * MB + 0x10, 8, "write")
    assert res["exit"] == mem_fault(64 * MB, True)
    assert res["mapped"] == 0
    assert load(vm, 64 * MB + 0x20, 4) == {"exit": mem_fault(64 * MB, True)}
    assert vm.stats()["mmio_sptes"] == mmio_before
    # The shared pages of the same slot map from the HVA as usual.
    assert access(vm, 64 * MB + PAGE)["exit"] is None
    assert_clean(vm)


def test_private_access_without_memslot_is_a_memory_fault_shared_is_mmio() -> None:
    vm, _ = gmem_vm()
    attrs(vm, 256 * MB, PAGE, True)
    assert access(vm, 256 * MB)["exit"] == mem_fault(256 * MB, True)
    assert vm.stats()["mmio_sptes"] == 0
    res = access(vm, 257 * MB)
    assert res["exit"]["reason"] == MMIO
    assert res["exit"]["gpa"] == 257 * MB
    assert_clean(vm)


def test_private_pages_are_4k_only() -> None:
    """guest_memfd hands out order-0 folios: private leaves are 4K even where the slot, the
    alignment and the host backing would allow 2 MiB (§2.3.1 step 8)."""
    vm, _ = gmem_vm(huge_host=True)
    attrs(vm, 0, 2 * MB, True)
    res = access(vm, 0, 4 * MB, "write")
    assert res["exit"] is None
    assert res["levels"] == {"4k": 512, "2m": 1, "1g": 0}
    assert mapped(vm) == {"shared": 512, "private": 512, "total": 1024}
    st = vm.stats()
    assert (st["pages_4k"], st["pages_2m"]) == (512, 1)
    assert_clean(vm)


def test_faults_follow_attributes_on_sw_protected() -> None:
    """SW_PROTECTED: KVM derives PRIVATE_ACCESS from the attributes, so a fault never
    disagrees with them (§2.1) — the private hint cannot force a mismatch exit."""
    vm, _ = gmem_vm()
    attrs(vm, 0, PAGE, True)
    res = vm.apply(
        parse("access", {"vcpu": 0, "gpa": 0, "size": PAGE, "access": "read", "private": False})
    )
    assert res["exit"] is None
    assert mapped(vm) == {"shared": 0, "private": 1, "total": 1}
    assert_clean(vm)


# -- guest_memfd -------------------------------------------------------------------------------
def test_punch_hole_zaps_private_sptes_then_frees() -> None:
    vm, fd = gmem_vm()
    attrs(vm, 0, 2 * MB, True)
    access(vm, 0, 8 * PAGE, "write")
    store(vm, 2 * PAGE, b"\xab" * 32)
    assert vm.guest_memfds()[0]["allocated_pages"] == 8
    res = vm.apply(
        parse("gmem_fallocate", {"fd": fd, "mode": "punch_hole", "offset": 0, "len": 4 * PAGE})
    )
    assert res["freed"] == 4
    zap = res["zap"]
    assert zap["cause"] == "punch_hole"
    assert zap["sptes_zapped_total"] == 4
    assert (zap["gfn_start"], zap["gfn_end"]) == (0, 4)
    assert mapped(vm) == {"shared": 0, "private": 4, "total": 4}
    assert vm.guest_memfds()[0]["allocated"] == [[4, 8]]
    assert_clean(vm)
    # The guest reads zeros where its data was; the page is allocated again on the fault.
    assert load(vm, 2 * PAGE, 32) == {"data": bytes(32).hex()}
    assert vm.guest_memfds()[0]["allocated_pages"] == 5
    assert_clean(vm)


def test_punch_hole_of_unbound_pages_frees_without_zap() -> None:
    vm = Vm.create(SW_PROT, 1)
    fd = vm.apply(parse("create_guest_memfd", {"size": 4 * MB, "flags": 0}))["fd"]
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": GMEM,
                "guest_phys_addr": 0,
                "memory_size": MB,
                "userspace_addr": HVA,
                "guest_memfd": fd,
                "guest_memfd_offset": 0,
            },
        ),
    )
    vm.apply(
        parse("gmem_fallocate", {"fd": fd, "mode": "allocate", "offset": 2 * MB, "len": 8 * PAGE})
    )
    events = len(vm.zap_events())
    res = vm.apply(
        parse("gmem_fallocate", {"fd": fd, "mode": "punch_hole", "offset": 2 * MB, "len": 8 * PAGE})
    )
    assert res == {"freed": 8, "zap": None}
    assert len(vm.zap_events()) == events
    assert_clean(vm)


def test_punch_hole_on_a_single_root_vm_zaps_shared_leaves_of_the_range_too() -> None:
    """Outside TDX the PRIVATE filter still selects the one direct root (§2.7.1): the range's
    shared leaves go as well (and simply refault from the HVA)."""
    vm, fd = gmem_vm()
    attrs(vm, 0, 2 * PAGE, True)
    access(vm, 0, 4 * PAGE)
    assert mapped(vm) == {"shared": 2, "private": 2, "total": 4}
    zap = vm.apply(
        parse("gmem_fallocate", {"fd": fd, "mode": "punch_hole", "offset": 0, "len": 4 * PAGE})
    )["zap"]
    assert zap["sptes_zapped_total"] == 4
    assert mapped(vm)["total"] == 0
    assert_clean(vm)


@pytest.mark.parametrize(
    ("mode", "offset", "length", "err"),
    [
        ("punch_hole", 100, PAGE, errno.EINVAL),
        ("punch_hole", 0, 100, errno.EINVAL),
        ("allocate", 4 * MB, PAGE, errno.EINVAL),  # beyond the (fixed) file size
        (0x08, 0, PAGE, errno.EOPNOTSUPP),  # COLLAPSE_RANGE
        (0x02, 0, PAGE, errno.EOPNOTSUPP),  # PUNCH_HOLE without KEEP_SIZE
    ],
)
def test_fallocate_bad_input_changes_nothing(
    mode: object, offset: int, length: int, err: int
) -> None:
    vm, fd = gmem_vm(size=4 * MB)
    attrs(vm, 0, PAGE, True)
    access(vm, 0)
    before = vm.guest_memfds()
    expect_errno(
        err,
        apply_json,
        vm,
        "gmem_fallocate",
        {"fd": fd, "mode": mode, "offset": offset, "len": length},
    )
    assert vm.guest_memfds() == before
    assert mapped(vm)["private"] == 1
    assert_clean(vm)


def test_gmem_close_zaps_and_later_private_faults_exit() -> None:
    vm, fd = gmem_vm()
    attrs(vm, 0, 2 * MB, True)
    access(vm, 0, 3 * PAGE, "write")
    access(vm, 2 * MB, 2 * PAGE)  # shared, HVA-backed
    res = vm.apply(parse("gmem_close", {"fd": fd}))
    zap = res["zap"]
    assert zap["cause"] == "gmem_close"
    # The whole bound range with the PRIVATE filter, which outside TDX selects the single
    # direct root (§2.7.1): the shared leaves of the range go too.
    assert zap["sptes_zapped_total"] == 5
    assert (zap["gfn_start"], zap["gfn_end"]) == (0, 2048)
    assert mapped(vm) == {"shared": 0, "private": 0, "total": 0}
    assert_clean(vm)
    assert access(vm, PAGE)["exit"] == mem_fault(PAGE, True)
    assert load(vm, 0, 4) == {"exit": mem_fault(0, True)}
    assert access(vm, 2 * MB, 3 * PAGE)["exit"] is None  # the shared half still maps
    assert mapped(vm)["shared"] == 3
    expect_errno(
        errno.EBADF,
        apply_json,
        vm,
        "gmem_fallocate",
        {"fd": fd, "mode": "punch_hole", "offset": 0, "len": PAGE},
    )
    assert_clean(vm)


def test_slot_delete_on_sw_protected_zaps_slot_leafs_and_keeps_gmem_memory() -> None:
    """Every VM type but DEFAULT takes the slot-leafs path (§4.4), quirk or not; guest_memfd
    memory outlives the slot until punched."""
    vm, fd = gmem_vm()
    attrs(vm, 0, PAGE, True)
    store(vm, 0, b"\x5a" * 4)
    access(vm, PAGE, 3 * PAGE)
    zap = vm.apply(
        parse(
            "set_user_memory_region",
            {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": HVA},
        ),
    )["zap"]
    assert zap["path"] == "zap_slot_leafs" and zap["cause"] == "memslot_delete"
    assert zap["sptes_zapped_total"] == 4
    assert zap["roots_invalidated"] == 0
    assert vm.guest_memfds()[0]["allocated_pages"] == 1
    assert vm.guest_memfds()[0]["bindings"] == []
    assert_clean(vm)
    assert access(vm, 0)["exit"] == mem_fault(0, True)  # private, no slot: never MMIO
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": GMEM,
                "guest_phys_addr": 0,
                "memory_size": 8 * MB,
                "userspace_addr": HVA,
                "guest_memfd": fd,
                "guest_memfd_offset": 0,
            },
        ),
    )
    assert load(vm, 0, 4) == {"data": (b"\x5a" * 4).hex()}
    assert_clean(vm)


# -- stats -------------------------------------------------------------------------------------
def test_stats_and_events_separate_private_from_shared_on_a_td() -> None:
    vm, _ = gmem_vm(TDX)
    attrs(vm, 0, 2 * MB, True)
    vm.apply(parse("accept", {"vcpu": 0, "gpa": 0, "size": 4 * PAGE}))
    access(vm, S47 | 2 * MB, 3 * PAGE)
    st = vm.stats()
    assert (st["private_pages_4k"], st["shared_pages_4k"], st["pages_4k"]) == (4, 3, 7)
    zap = vm.apply(
        parse(
            "set_user_memory_region",
            {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": HVA},
        ),
    )["zap"]
    assert zap["sptes_zapped"]["mirror"]["4k"] == 4
    assert zap["sptes_zapped"]["direct"]["4k"] == 3
    assert zap["sptes_zapped"]["4k"] == 7
    assert_clean(vm)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vm_type", "address", "size", "attributes", "flags"),
    [
        (SW_PROT, 0, PAGE, PRIVATE, 1),  # flags
        (SW_PROT, 0, PAGE, 1 << 4, 0),  # unsupported attribute bit
        (SW_PROT, 0, 0, PRIVATE, 0),  # empty
        (SW_PROT, 0x800, PAGE, PRIVATE, 0),  # unaligned address
        (SW_PROT, 0, PAGE + 1, PRIVATE, 0),  # unaligned size
        (SW_PROT, (1 << 64) - PAGE, 2 * PAGE, PRIVATE, 0),  # wraps
        (DEFAULT, 0, PAGE, PRIVATE, 0),  # no private memory
        (TDX, 0, PAGE, PRIVATE | 1, 0),
    ],
)
def test_attribute_bad_input_is_einval_and_changes_nothing(
    vm_type: int, address: int, size: int, attributes: int, flags: int
) -> None:
    vm = Vm.create(vm_type, 1)
    plain_slot(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0, 4 * PAGE)
    events = len(vm.zap_events())
    expect_errno(
        errno.EINVAL,
        apply_json,
        vm,
        "set_memory_attributes",
        {"address": address, "size": size, "attributes": attributes, "flags": flags},
    )
    assert vm.memory_attributes() == []
    assert len(vm.zap_events()) == events
    assert_clean(vm)


# -- regression cases from the engine review --------------------------------------------------
def test_audit_flags_shared_2m_leaf_over_a_private_gfn() -> None:
    vm = Vm.create(kit.SW_PROTECTED)
    kit.hugepage(vm, kit.HVA, kit.M2)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0)  # one shared 2M leaf over gfn 0..511
    assert vm.audit()["ok"] is True
    vm.attrs.set(5, 6, kit.PRIVATE)  # corrupt on purpose: gfn 5 private, the leaf kept
    audit = vm.audit()
    assert audit["ok"] is False
    assert [v["rule"] for v in audit["violations"]] == ["shared_leaf_attribute"]
    assert audit["checked"]["leaves"] == {"4k": 0, "2m": 1, "1g": 0}
