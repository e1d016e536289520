"""Regression tests for the engine review findings (/tmp/review_engine/r_*.py).

Each test replays one reviewer scenario and pins the fixed behaviour with exact values: zap
ranges and SPTE counts, errnos, flush/TRACK counts and statistics. Rejected calls are checked
to leave the VM's digest unchanged unless KVM itself changes state on that error.
"""

from __future__ import annotations

import base64
import errno
from typing import Any

import pytest

from app.engine import KvmError, Vm, codec
from app.engine.ops import parse

DEFAULT, SW_PROTECTED, TDX = 0, 1, 5
PRIVATE = 8
LOG_DIRTY, READONLY, GMEM = 1, 2, 4
MMAP, INIT_SHARED = 1, 2
PAGE, MB, GB = 4096, 1 << 20, 1 << 30
M2 = 2 * MB
HVA = 1 << 30
S47 = 1 << 47
MANUAL_PROTECT_CAP, DISABLE_QUIRKS2 = 168, 213
SLOT_ZAP_ALL = 0x80
TRACK, REMOVE = "TDH.MEM.TRACK", "TDH.MEM.PAGE.REMOVE"


# -- helpers -----------------------------------------------------------------------------------
def region(vm: Vm, slot: int, gpa: int, size: int, hva: int, flags: int = 0, **kw: int) -> dict:
    args = dict(
        slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva, **kw
    )
    return vm.apply(parse("set_user_memory_region", args))


def access(vm: Vm, gpa: int, size: int = PAGE, kind: str = "read") -> dict:
    return vm.apply(parse("access", dict(vcpu=0, gpa=gpa, size=size, access=kind)))


def attrs(vm: Vm, address: int, size: int, private: bool) -> dict:
    return vm.apply(
        parse(
            "set_memory_attributes",
            dict(address=address, size=size, attributes=PRIVATE if private else 0),
        ),
    )


def hugepage(vm: Vm, hva: int, size: int) -> None:
    vm.apply(parse("host_advise", dict(userspace_addr=hva, len=size, advice="hugepage")))


def rejected(vm: Vm, op: Any, args: Any) -> KvmError:
    """Apply a call KVM must reject without changing state; return the error."""
    before = codec.digest(vm)
    with pytest.raises(KvmError) as info:
        vm.apply(parse(op, args))
    assert info.value.state_changed is False
    assert codec.digest(vm) == before
    return info.value


def td_with_gmem(size: int, slots: int = 1) -> tuple[Vm, int]:
    """A TD whose guest_memfd of `size` bytes is split evenly over `slots` adjacent slots,
    all PRIVATE."""
    td = Vm.create(TDX)
    fd = td.apply(parse("create_guest_memfd", dict(size=size)))["fd"]
    part = size // slots
    for s in range(slots):
        region(
            td, s, s * part, part, HVA + s * part, GMEM, guest_memfd=fd, guest_memfd_offset=s * part
        )
    attrs(td, 0, size, True)
    return td, fd


def mirror_leaf_raw(td: Vm, gpa: int) -> str:
    (mirror,) = [r for r in td.translate(gpa)["roots"] if r["role"] == "mirror"]
    last = mirror["walk"][-1]
    assert last["leaf"] is True
    return str(last["raw"])


# -- 1. r_attr_widen ---------------------------------------------------------------------------
def test_attributes_zap_exactly_the_changed_range_of_4k_leaves() -> None:
    vm = Vm.create(SW_PROTECTED)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0, M2)  # 512 shared 4K leaves (4K host pages)
    out = attrs(vm, 0x1000, 0x1000, True)
    assert out["changed"] is True
    zap = out["zap"]
    assert (zap["cause"], zap["gfn_start"], zap["gfn_end"]) == ("attributes", 1, 2)
    assert zap["sptes_zapped_total"] == 1
    assert zap["sptes_zapped"]["4k"] == 1
    assert vm.stats()["pages_4k"] == 511
    assert vm.zap_events()[-1]["gfn_start"] == 1 and vm.zap_events()[-1]["gfn_end"] == 2


def test_attributes_zap_of_several_pages_counts_only_those() -> None:
    vm = Vm.create(SW_PROTECTED)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0, M2)
    zap = attrs(vm, 0x3000, 0x5000, True)["zap"]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (3, 8, 5)
    assert vm.stats()["pages_4k"] == 507


def test_attributes_zap_takes_a_whole_2m_leaf_that_intersects_the_range() -> None:
    vm = Vm.create(SW_PROTECTED)
    hugepage(vm, HVA, M2)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0)
    assert vm.stats()["pages_2m"] == 1
    zap = attrs(vm, 0x1000, 0x1000, True)["zap"]
    assert (zap["gfn_start"], zap["gfn_end"]) == (1, 2)
    assert zap["sptes_zapped"]["2m"] == 1 and zap["sptes_zapped_total"] == 1
    s = vm.stats()
    assert (s["pages_2m"], s["pages_4k"]) == (0, 0)


# -- 2. r_budget_midrun ------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [5, 6, 7])
def test_tiny_budget_access_into_mmio_answers_the_mmio_exit(budget: int) -> None:
    vm = Vm.create(DEFAULT, table_budget=budget)
    region(vm, 0, 0, PAGE, HVA)
    r = access(vm, 0, 2 * PAGE)  # page 0 in the slot, page 1 is MMIO
    assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": PAGE, "len": 8, "is_write": False}
    assert r["mapped"] == 1
    s = vm.stats()
    # No room for the MMIO SPTE's tables: KVM emulates without caching one.
    assert (s["pages_4k"], s["page_tables"], s["mmio_sptes"]) == (1, 4, 0)
    assert s["pf_mmio_spte_created"] == 0


def test_budget_with_room_still_caches_the_mmio_spte() -> None:
    vm = Vm.create(DEFAULT, table_budget=8)
    region(vm, 0, 0, PAGE, HVA)
    assert access(vm, 0, 2 * PAGE)["exit"]["reason"] == "KVM_EXIT_MMIO"
    assert vm.stats()["mmio_sptes"] == 1


@pytest.mark.parametrize("budget", [1, 4])
def test_budget_rejection_is_up_front_and_changes_nothing(budget: int) -> None:
    vm = Vm.create(DEFAULT, table_budget=budget)
    region(vm, 0, 0, PAGE, HVA)
    err = rejected(vm, "access", dict(vcpu=0, gpa=0, size=2 * PAGE))
    assert err.errno == errno.ENOMEM
    assert vm.stats()["pages_4k"] == 0


# -- 3. r_gmem_mmap_noshared -------------------------------------------------------------------
@pytest.mark.parametrize(("vm_type", "flags"), [(TDX, MMAP), (DEFAULT, MMAP), (SW_PROTECTED, MMAP)])
def test_gmem_host_io_of_mmap_file_without_init_shared_is_efault(vm_type: int, flags: int) -> None:
    vm = Vm.create(vm_type)
    fd = vm.apply(parse("create_guest_memfd", dict(size=MB, flags=flags)))["fd"]
    before = codec.digest(vm)
    with pytest.raises(KvmError) as info:
        vm.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.EFAULT
    err = rejected(vm, "gmem_write", dict(fd=fd, offset=0, data="ff"))
    assert err.errno == errno.EFAULT
    assert codec.digest(vm) == before


def test_gmem_host_io_after_td_store_is_efault() -> None:
    td = Vm.create(TDX)
    fd = td.apply(parse("create_guest_memfd", dict(size=MB, flags=MMAP)))["fd"]
    region(td, 0, 0, MB, HVA, GMEM, guest_memfd=fd)
    attrs(td, 0, MB, True)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=PAGE)))
    td.apply(parse("store", dict(vcpu=0, gpa=0, data="5ec2e7")))
    with pytest.raises(KvmError) as info:
        td.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.EFAULT
    assert rejected(td, "gmem_write", dict(fd=fd, offset=0, data="ff")).errno == errno.EFAULT
    assert td.apply(parse("load", dict(vcpu=0, gpa=0, len=3)))["data"] == "5ec2e7"


@pytest.mark.parametrize("vm_type", [TDX, DEFAULT])
def test_gmem_host_io_without_mmap_is_enodev(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    fd = vm.apply(parse("create_guest_memfd", dict(size=MB, flags=0)))["fd"]
    with pytest.raises(KvmError) as info:
        vm.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.ENODEV
    assert rejected(vm, "gmem_write", dict(fd=fd, offset=0, data="ff")).errno == errno.ENODEV


def test_gmem_host_io_with_mmap_and_init_shared_works() -> None:
    vm = Vm.create(DEFAULT)
    fd = vm.apply(parse("create_guest_memfd", dict(size=MB, flags=MMAP | INIT_SHARED)))["fd"]
    assert vm.apply(parse("gmem_write", dict(fd=fd, offset=0, data="ab")))["written"] == 1
    assert vm.gmem_read(fd, 0, 2) == {"data": "ab00"}


# -- 4. r_ro_logging_off -----------------------------------------------------------------------
def test_logging_off_on_readonly_slot_frees_the_bitmap() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, MB, HVA, READONLY | LOG_DIRTY)
    assert vm.memslot(0)["dirty_logging"] is True
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["num_pages"] == 256
    region(vm, 0, 0, MB, HVA, READONLY)  # FLAGS_ONLY: logging off
    assert vm.memslot(0)["dirty_logging"] is False
    assert rejected(vm, "get_dirty_log", dict(slot=0)).errno == errno.ENOENT


# -- 5. r_emptytable_flush ---------------------------------------------------------------------
def test_huge_leaf_replacing_an_empty_table_costs_one_flush_request() -> None:
    vm = Vm.create(DEFAULT)
    vm.apply(parse("enable_cap", dict(cap=DISABLE_QUIRKS2, args=[SLOT_ZAP_ALL])))  # precise zaps
    vm.apply(parse("host_map", dict(userspace_addr=HVA, len=M2, page_size=M2)))
    region(vm, 0, 0, M2, HVA)
    access(vm, 0)  # one 2M leaf at gfn 0
    region(vm, 1, 4 * MB, PAGE, 2 * HVA)
    access(vm, 4 * MB)  # a 4K leaf in a level-1 table at 4M
    assert vm.stats()["page_tables"] == 4
    region(vm, 1, 0, 0, 0)  # precise zap: the emptied table stays
    assert vm.stats()["page_tables"] == 4
    vm.apply(parse("host_map", dict(userspace_addr=2 * HVA, len=M2, page_size=M2)))
    region(vm, 1, 4 * MB, M2, 2 * HVA)
    before = vm.stats()["remote_tlb_flush_requests"]
    r = access(vm, 4 * MB)
    assert r["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    s = vm.stats()
    assert s["remote_tlb_flush_requests"] - before == 1
    assert (s["page_tables"], s["pages_2m"], s["pages_4k"]) == (3, 2, 0)
    assert vm.audit()["ok"] is True


# -- 6. r_gmem_multibind_flush -----------------------------------------------------------------
def test_td_punch_of_file_bound_to_two_slots_is_one_flush_and_one_zap_event() -> None:
    td, fd = td_with_gmem(M2, slots=2)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=M2)))
    st0, events0 = td.stats(), len(td.zap_events())
    r = td.apply(parse("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=M2)))
    st1 = td.stats()
    assert st1["remote_tlb_flush_requests"] - st0["remote_tlb_flush_requests"] == 1
    assert st1["tdx_tdh_mem_track"] - st0["tdx_tdh_mem_track"] == 512
    assert st1["tdx_tdh_mem_page_remove"] - st0["tdx_tdh_mem_page_remove"] == 512
    zap = r["zap"]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (0, 512, 512)
    assert len(td.zap_events()) - events0 == 1
    assert st1["pages_4k"] == 0 and st1["tdx_accepted_pages"] == 0
    assert td.audit()["ok"] is True


# -- 7. r_tdx_misc (a) / r_tdx -----------------------------------------------------------------
def test_td_shared_only_zap_adds_no_track() -> None:
    td, _ = td_with_gmem(MB)
    attrs(td, 0, MB, False)
    access(td, S47)  # one shared leaf through the direct root
    ops0, st0 = td.tdx_state()["ops"], td.stats()
    zap = td.apply(parse("host_discard", dict(userspace_addr=HVA, len=PAGE)))["zap"]
    assert zap["sptes_zapped_total"] == 1 and zap["sptes_zapped"]["direct"]["4k"] == 1
    st1 = td.stats()
    assert td.tdx_state()["ops"] == ops0  # no TDH.MEM.TRACK (nor any other SEAMCALL)
    assert st1["remote_tlb_flush_requests"] - st0["remote_tlb_flush_requests"] == 1
    assert st1["tdx_tdh_mem_track"] == st0["tdx_tdh_mem_track"]


def test_td_private_zap_still_costs_one_track() -> None:
    td, _ = td_with_gmem(2 * MB)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=2 * PAGE)))
    ops0 = td.tdx_state()["ops"]
    attrs(td, 0, PAGE, False)  # to shared: S-EPT BLOCK/TRACK/REMOVE of one page
    ops1 = td.tdx_state()["ops"]
    assert ops1[TRACK] - ops0[TRACK] == 1
    assert ops1[REMOVE] - ops0[REMOVE] == 1


# -- 8. r_prefault_private_noslot --------------------------------------------------------------
@pytest.mark.parametrize("vm_type", [SW_PROTECTED, TDX])
def test_prefault_of_private_gfn_without_memslot_is_efault(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    attrs(vm, 0, PAGE, True)
    with pytest.raises(KvmError) as info:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=PAGE)))
    assert info.value.errno == errno.EFAULT
    exit_ = access(vm, 0)["exit"]
    assert exit_ == {"reason": "KVM_EXIT_MEMORY_FAULT", "gpa": 0, "size": PAGE, "flags": PRIVATE}


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROTECTED, TDX])
def test_prefault_of_shared_hole_is_enoent(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    if vm_type != DEFAULT:
        attrs(vm, 0, PAGE, True)
    with pytest.raises(KvmError) as info:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0x10000, size=PAGE)))
    assert info.value.errno == errno.ENOENT


# -- 9. r_perf_prefault / r_perf ---------------------------------------------------------------
def test_prefault_of_1gib_maps_every_page() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, GB, GB)
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=GB))) == {"gpa": GB, "size": 0}
    s = vm.stats()
    # 4K host pages: 262144 leaves in 512 level-1 tables under one PD, PDPT and PML4.
    assert (s["pages_4k"], s["pages_2m"], s["page_tables"]) == (GB // PAGE, 0, 515)


def test_tdx_accept_of_256mib_maps_and_accepts_every_page() -> None:
    size = GB // 4
    td, _ = td_with_gmem(size)
    r = td.apply(parse("accept", dict(vcpu=0, gpa=0, size=size)))
    n = size // PAGE
    assert r == {"accepted": n, "reaccepted": 0, "exit": None}
    s = td.stats()
    assert (s["pages_4k"], s["private_pages_4k"], s["tdx_accepted_pages"]) == (n, n, n)
    assert (s["tdx_tdh_mem_page_aug"], s["tdx_tdg_mem_page_accept"]) == (n, n)
    assert td.audit()["ok"] is True


# -- 10. r_perf2 -------------------------------------------------------------------------------
def test_accept_every_other_page_then_punch_is_consistent() -> None:
    n = 1 << 14
    td, fd = td_with_gmem(n * PAGE)
    for g in range(0, n, 2):
        td.apply(parse("accept", dict(vcpu=0, gpa=g * PAGE, size=PAGE)))
    state = td.tdx_state()
    assert state["accepted_pages"] == n // 2
    assert state["ops"]["TDH.MEM.PAGE.AUG"] == n // 2
    assert td.stats()["private_pages_4k"] == n // 2
    zap = td.apply(parse("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=n * PAGE)))[
        "zap"
    ]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (0, n, n // 2)
    state = td.tdx_state()
    assert state["accepted_pages"] == 0
    assert state["pending_reaccept_pages"] == n // 2
    assert state["ops"][REMOVE] == n // 2 and state["ops"][TRACK] == n // 2
    s = td.stats()
    assert (s["pages_4k"], s["private_pages_4k"], s["tdx_accepted_pages"]) == (0, 0, 0)
    assert td.audit()["ok"] is True
    # A later accept of a punched (previously accepted) page and a never-accepted one.
    assert td.apply(parse("accept", dict(vcpu=0, gpa=0, size=2 * PAGE))) == {
        "accepted": 2,
        "reaccepted": 1,
        "exit": None,
    }
    assert td.apply(parse("load", dict(vcpu=0, gpa=0, len=1)))["data"] == "00"


# -- 11. r_accept_zero -------------------------------------------------------------------------
def test_reaccept_zeroes_pages_in_every_slot_of_the_range() -> None:
    td, _ = td_with_gmem(M2, slots=2)  # two adjacent gmem slots, 1 MiB each
    a, b = MB - PAGE, MB  # last page of slot 0, first page of slot 1
    td.apply(parse("accept", dict(vcpu=0, gpa=a, size=2 * PAGE)))
    td.apply(parse("store", dict(vcpu=0, gpa=a, data="aa")))
    td.apply(parse("store", dict(vcpu=0, gpa=b, data="bb")))
    attrs(td, a, 2 * PAGE, False)  # to shared: S-EPT REMOVE
    attrs(td, a, 2 * PAGE, True)  # back to private
    r = td.apply(parse("accept", dict(vcpu=0, gpa=a, size=2 * PAGE)))
    assert r == {"accepted": 2, "reaccepted": 2, "exit": None}
    assert td.apply(parse("load", dict(vcpu=0, gpa=a, len=1)))["data"] == "00"
    assert td.apply(parse("load", dict(vcpu=0, gpa=b, len=1)))["data"] == "00"


# -- 12. r_clear_split -------------------------------------------------------------------------
def test_clear_dirty_log_splits_only_huge_pages_under_set_bits() -> None:
    vm = Vm.create(DEFAULT)
    vm.apply(
        parse("enable_cap", dict(cap=MANUAL_PROTECT_CAP, args=[3]))
    )  # MANUAL_PROTECT | INIT_SET
    hugepage(vm, HVA, 4 * M2)
    region(vm, 0, 0, 4 * M2, HVA)
    access(vm, 0, 4 * M2)  # 4 x 2M leaves
    region(vm, 0, 0, 4 * M2, HVA, LOG_DIRTY)  # bitmap all ones, nothing split yet
    assert vm.stats()["pages_2m"] == 4
    bm = bytearray(2048 // 8)
    bm[0] = 1  # clear only page 0
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=2048, bitmap=base64.b64encode(bm).decode()),
        ),
    )
    assert out == {"cleared": 1, "sptes_write_protected": 1}
    s = vm.stats()
    assert (s["pages_2m"], s["pages_4k"]) == (3, 512)
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 1
    assert vm.translate(M2)["roots"][0]["leaf"]["level"] == 2


# -- 13. r_prefault_table ----------------------------------------------------------------------
def test_prefault_never_replaces_a_present_table() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0)  # one 4K leaf -> a level-1 table
    hugepage(vm, HVA, M2)
    tables = vm.stats()["page_tables"]
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=PAGE, size=PAGE))) == {
        "gpa": 2 * PAGE,
        "size": 0,
    }
    s = vm.stats()
    assert (s["pages_4k"], s["pages_2m"], s["page_tables"]) == (1, 0, tables)
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 1


@pytest.mark.parametrize("kind", ["read", "write"])
def test_prefault_leaves_accessed_dirty_of_present_leaves_untouched(kind: str) -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0, PAGE, kind)
    before = vm.translate(0)["roots"][0]["walk"][-1]
    assert before["accessed"] is True
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=2 * PAGE))) == {
        "gpa": 2 * PAGE,
        "size": 0,
    }
    after = vm.translate(0)["roots"][0]["walk"][-1]
    assert after["raw"] == before["raw"]
    # The newly prefetched neighbour has no Accessed bit.
    assert vm.translate(PAGE)["roots"][0]["walk"][-1]["accessed"] is False


# -- 14. r_zapped_acct -------------------------------------------------------------------------
def test_huge_leaf_replacing_a_table_is_not_zapped_not_refaulted() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0, MB)  # first half mapped at 4K
    hugepage(vm, HVA, M2)
    r = access(vm, MB)  # a 2M leaf replaces the 4K table
    assert r["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    s = vm.stats()
    assert (s["zapped_not_refaulted"], s["remote_tlb_flush_requests"]) == (0, 1)
    assert (s["pages_4k"], s["pages_2m"]) == (0, 1)
    r = access(vm, 0)  # already mapped by the 2M leaf
    assert (r["refaults"], r["spurious"]) == (0, 1)
    assert vm.stats()["zapped_not_refaulted"] == 0
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 2


# -- 15. r_audit_fp ----------------------------------------------------------------------------
def test_no_false_no_huge_while_logging_after_manual_protect_cap_change() -> None:
    vm = Vm.create(DEFAULT)
    vm.apply(parse("enable_cap", dict(cap=MANUAL_PROTECT_CAP, args=[3])))
    hugepage(vm, HVA, M2)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0)  # one 2M leaf
    region(vm, 0, 0, M2, HVA, LOG_DIRTY)  # INITIALLY_SET: the huge leaf stays
    assert vm.stats()["pages_2m"] == 1
    vm.apply(parse("enable_cap", dict(cap=MANUAL_PROTECT_CAP, args=[1])))  # legal at any time
    audit = vm.audit()
    assert audit["violations"] == []
    assert audit["ok"] is True


# -- 16. r_audit_fn ----------------------------------------------------------------------------
def test_audit_flags_shared_2m_leaf_over_a_private_gfn() -> None:
    vm = Vm.create(SW_PROTECTED)
    hugepage(vm, HVA, M2)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0)  # one shared 2M leaf over gfn 0..511
    assert vm.audit()["ok"] is True
    vm.attrs.set(5, 6, PRIVATE)  # corrupt on purpose: gfn 5 private, the leaf kept
    audit = vm.audit()
    assert audit["ok"] is False
    assert [v["rule"] for v in audit["violations"]] == ["shared_leaf_attribute"]
    assert audit["checked"]["leaves"] == {"4k": 0, "2m": 1, "1g": 0}


# -- 17. r_crash -------------------------------------------------------------------------------
def test_host_map_with_list_page_size_is_einval() -> None:
    vm = Vm.create(DEFAULT)
    args = dict(userspace_addr=HVA, len=M2, page_size=[M2])
    assert rejected(vm, "host_map", args).errno == errno.EINVAL


@pytest.mark.parametrize("op", [["access"], ("access",), None, 7])
def test_non_string_op_is_einval(op: Any) -> None:
    vm = Vm.create(DEFAULT)
    assert rejected(vm, op, {}).errno == errno.EINVAL


# -- 18. bad argument types / unknown keys -----------------------------------------------------
def test_access_with_bool_gpa_is_einval() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, MB, HVA)
    assert rejected(vm, "access", dict(vcpu=0, gpa=True, size=PAGE)).errno == errno.EINVAL
    assert vm.stats()["pages_4k"] == 0


def test_set_user_memory_region_with_unknown_key_is_einval_and_adds_no_slot() -> None:
    vm = Vm.create(DEFAULT)
    args = dict(slot=0, flags=0, guest_phys_adr=0, memory_size=PAGE, userspace_addr=HVA)
    assert rejected(vm, "set_user_memory_region", args).errno == errno.EINVAL
    assert vm.memslots() == []
    with pytest.raises(KvmError) as info:
        vm.memslot(0)
    assert info.value.errno == errno.ENOENT


# -- 19. r_tdx_misc (b), (c) -------------------------------------------------------------------
def test_mirror_spte_never_changes_present_to_present() -> None:
    td, _ = td_with_gmem(MB)
    assert td.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=PAGE))) == {"gpa": PAGE, "size": 0}
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=PAGE)))
    raw = mirror_leaf_raw(td, 0)
    r = access(td, 0)
    assert (r["mapped"], r["spurious"]) == (0, 1)
    assert mirror_leaf_raw(td, 0) == raw
    access(td, 0, PAGE, "write")
    assert mirror_leaf_raw(td, 0) == raw


def test_td_exec_from_shared_gpa_kills_the_vm_with_eio() -> None:
    td, fd = td_with_gmem(MB)
    attrs(td, 0, MB, False)
    with pytest.raises(KvmError) as info:
        access(td, S47 | 0x2000, PAGE, "exec")
    assert info.value.errno == errno.EIO
    assert info.value.state_changed is True
    later: list[tuple[str, dict[str, Any]]] = [
        ("access", dict(vcpu=0, gpa=S47, size=PAGE)),
        ("accept", dict(vcpu=0, gpa=0, size=PAGE)),
        ("set_memory_attributes", dict(address=0, size=PAGE, attributes=PRIVATE)),
        ("create_guest_memfd", dict(size=PAGE)),
        ("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=PAGE)),
        ("set_user_memory_region", dict(slot=0, flags=GMEM, memory_size=0)),
    ]
    for op, args in later:
        with pytest.raises(KvmError) as info:
            td.apply(parse(op, args))
        assert info.value.errno == errno.EIO, op


# -- 20. r_vcpu_stats --------------------------------------------------------------------------
def test_pf_stats_count_per_leaf_and_new_mmio_sptes_only() -> None:
    vm = Vm.create(DEFAULT)
    region(vm, 0, 0, 4 * MB, HVA)
    access(vm, 0, 4 * MB)  # 1024 new 4K leaves
    s = vm.stats()
    assert (s["pf_taken"], s["pf_fixed"]) == (1024, 1024)
    for _ in range(3):
        r = access(vm, GB, 4)  # the same MMIO gpa three times
        assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": GB, "len": 4, "is_write": False}
    s = vm.stats()
    assert (s["pf_mmio_spte_created"], s["mmio_sptes"]) == (1, 1)
    # Only the fault that created the MMIO SPTE is a page fault; later hits take the fast path.
    assert (s["pf_taken"], s["pf_fixed"]) == (1025, 1024)
    access(vm, 0, 4 * MB)  # all present: no new faults
    s = vm.stats()
    assert (s["pf_taken"], s["pf_fixed"]) == (1025, 1024)


# -- found while writing these tests ---------------------------------------------------------------
def test_present_4k_leaves_under_later_thp_advice_are_plain_touches() -> None:
    """4K leaves mapped before THP advice: touching them is no fault and always progresses;
    a missing neighbour then faults a 2M leaf that replaces the table (one flush)."""
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, M2, HVA)
    access(vm, 0, 2 * PAGE)
    vm.apply(parse("host_advise", dict(userspace_addr=HVA, len=M2, advice="hugepage")))
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=PAGE))) == {"gpa": PAGE, "size": 0}
    r = access(vm, 0, 2 * PAGE)
    assert (r["pages"], r["spurious"], r["mapped"]) == (2, 2, 0)
    flushes = vm.stats()["remote_tlb_flush_requests"]
    r = access(vm, 0, M2)
    assert (r["pages"], r["spurious"], r["levels"]) == (512, 2, {"4k": 0, "2m": 1, "1g": 0})
    assert vm.stats()["remote_tlb_flush_requests"] == flushes + 1
    assert (vm.stats()["pages_4k"], vm.stats()["pages_2m"]) == (0, 1)
    assert vm.audit()["ok"]


def test_failed_pre_fault_that_built_tables_says_state_changed() -> None:
    """ENOENT from pre-fault of a hole: the walk built a root, tables and an MMIO SPTE first (as
    the kernel's does), so the error is flagged for the journal; the vCPU holds that root."""
    vm = Vm.create(DEFAULT, 1)
    d0 = codec.digest(vm)
    with pytest.raises(KvmError) as e:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=PAGE)))
    assert e.value.errno == errno.ENOENT and e.value.state_changed
    assert codec.digest(vm) != d0
    assert vm.vcpus_view()[0]["roots"] == {"direct": vm.roots()[0]["id"]}
