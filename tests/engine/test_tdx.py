"""TDX (KVM_X86_TDX_VM) on the engine: mirror root, S-EPT operations, pending/accept, slot
delete/move, explicit zaps and the rejected "zap all shared only" design (issue 4).

Kernel behaviour per kvm-private-tdx.md §1.3 (shared bit), §2 (faults), §3.5 (conversions),
§4.4–4.5 (slot delete, gmem close), §5 (TDX) and §7 (invariants). Every normal scenario ends with
a clean `audit`.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse
from tests.engine import mmu as kit
from tests.engine.mmu import apply_json

TDX, DEFAULT = 5, 0
PRIVATE = 8
GMEM, READONLY = 4, 2
PAGE = 4096
MB = 1 << 20
HVA = 0x7F00_0000_0000
S47, S51 = 1 << 47, 1 << 51
MEMORY_FAULT = "KVM_EXIT_MEMORY_FAULT"
MMIO = "KVM_EXIT_MMIO"
EPERM = 1
BLOCK, TRACK, REMOVE = "TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "TDH.MEM.PAGE.REMOVE"
WBINVD, RECLAIM = "TDH.PHYMEM.PAGE.WBINVD", "TDH.PHYMEM.PAGE.RECLAIM"
SEPT_ADD, AUG, ACCEPT = "TDH.MEM.SEPT.ADD", "TDH.MEM.PAGE.AUG", "TDG.MEM.PAGE.ACCEPT"


# -- helpers -----------------------------------------------------------------------------------
def make_td(
    levels: int = 4, size: int = 8 * MB, private: int = 2 * MB, huge_host: bool = False
) -> tuple[Vm, int]:
    """A TD with guest_memfd slot 0 at GPA 0 whose first `private` bytes are PRIVATE."""
    td = Vm.create(TDX, 1, paging_levels=levels)
    fd = td.apply(parse("create_guest_memfd", {"size": size, "flags": 0}))["fd"]
    if huge_host:
        td.apply(parse("host_map", {"userspace_addr": HVA, "len": size, "page_size": 2 * MB}))
    td.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": GMEM,
                "guest_phys_addr": 0,
                "memory_size": size,
                "userspace_addr": HVA,
                "guest_memfd": fd,
                "guest_memfd_offset": 0,
            },
        ),
    )
    if private:
        attrs(td, 0, private, True)
    return td, fd


def attrs(vm: Vm, address: int, size: int, private: bool) -> dict[str, Any]:
    return vm.apply(
        parse(
            "set_memory_attributes",
            {"address": address, "size": size, "attributes": PRIVATE if private else 0, "flags": 0},
        ),
    )


def access(vm: Vm, gpa: int, size: int = PAGE, kind: str = "read") -> dict[str, Any]:
    return vm.apply(parse("access", {"vcpu": 0, "gpa": gpa, "size": size, "access": kind}))


def accept(vm: Vm, gpa: int, size: int = PAGE) -> dict[str, Any]:
    return vm.apply(parse("accept", {"vcpu": 0, "gpa": gpa, "size": size}))


def load(vm: Vm, gpa: int, n: int) -> dict[str, Any]:
    return vm.apply(parse("load", {"vcpu": 0, "gpa": gpa, "len": n}))


def store(vm: Vm, gpa: int, data: bytes) -> dict[str, Any]:
    return vm.apply(parse("store", {"vcpu": 0, "gpa": gpa, "data": data.hex()}))


def delete_slot(vm: Vm, slot: int = 0) -> dict[str, Any]:
    return vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": slot,
                "flags": 0,
                "guest_phys_addr": 0,
                "memory_size": 0,
                "userspace_addr": HVA,
            },
        ),
    )


def ops(vm: Vm) -> dict[str, int]:
    return dict(vm.tdx_state()["ops"])


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def roots_by_role(vm: Vm) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in vm.roots():
        assert r["role"] not in out, f"two {r['role']} roots: {vm.roots()}"
        out[r["role"]] = r
    return out


def mem_fault(gpa: int, private: bool, size: int = PAGE) -> dict[str, Any]:
    return {"reason": MEMORY_FAULT, "gpa": gpa, "size": size, "flags": PRIVATE if private else 0}


def assert_clean(vm: Vm) -> None:
    report = vm.audit()
    assert report["ok"], report["violations"]


def expect_errno(err: int, fn, *args: Any) -> KvmError:  # type: ignore[no-untyped-def]
    with pytest.raises(KvmError) as info:
        fn(*args)
    assert info.value.errno == err, info.value
    return info.value


# -- roots and the shared bit ------------------------------------------------------------------
@pytest.mark.parametrize(("levels", "shared_bit"), [(4, S47), (5, S51)])
def test_shared_bit_selects_mirror_or_direct_root(levels: int, shared_bit: int) -> None:
    td, _ = make_td(levels)
    assert td.info()["gfn_direct_bits"] == shared_bit >> 12
    assert accept(td, 0, 2 * PAGE) == {"accepted": 2, "reaccepted": 0, "exit": None}
    assert access(td, shared_bit | 2 * MB, 3 * PAGE, "write")["exit"] is None
    roots = roots_by_role(td)
    assert set(roots) == {"mirror", "direct"}
    assert roots["mirror"]["level"] == roots["direct"]["level"] == levels
    assert roots["mirror"]["valid"] and roots["direct"]["valid"]
    assert roots["mirror"]["sptes"] == {"4k": 2, "2m": 0, "1g": 0}
    assert roots["direct"]["sptes"] == {"4k": 3, "2m": 0, "1g": 0}
    st = td.stats()
    assert (st["private_pages_4k"], st["shared_pages_4k"]) == (2, 3)
    assert_clean(td)


def test_bit_47_is_an_ordinary_gpa_bit_with_5_level_ept() -> None:
    td, _ = make_td(5)
    # Shared bit 51 clear: a private GPA with GFN bit 35 set, beyond every memslot.
    res = access(td, S47 | 2 * MB)
    assert res["exit"] == mem_fault(S47 | 2 * MB, True)
    assert td.stats()["pages_4k"] == 0
    assert_clean(td)


def test_private_access_to_a_shared_gfn_is_a_memory_fault() -> None:
    td, _ = make_td()
    res = access(td, 4 * MB, PAGE, "write")  # shared bit clear, attribute shared
    assert res["exit"] == mem_fault(4 * MB, True)
    assert res["mapped"] == 0
    assert load(td, 4 * MB + 0x123, 8) == {"exit": mem_fault(4 * MB, True)}
    assert td.stats()["pages_4k"] == 0
    assert_clean(td)


def test_shared_access_to_a_private_gfn_is_a_memory_fault_without_shared_bit() -> None:
    td, _ = make_td()
    res = access(td, S47 | 3 * PAGE)
    assert res["exit"] == mem_fault(3 * PAGE, False)
    assert load(td, S47 | 5 * PAGE + 0x40, 4) == {"exit": mem_fault(5 * PAGE, False)}
    assert td.stats()["pages_4k"] == 0
    assert_clean(td)


def test_private_access_to_slot_without_guest_memfd_is_a_memory_fault_never_mmio() -> None:
    td, _ = make_td()
    td.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 1,
                "flags": 0,
                "guest_phys_addr": 64 * MB,
                "memory_size": MB,
                "userspace_addr": HVA + 64 * MB,
            },
        ),
    )
    attrs(td, 64 * MB, PAGE, True)
    assert access(td, 64 * MB)["exit"] == mem_fault(64 * MB, True)
    assert accept(td, 64 * MB)["exit"] == mem_fault(64 * MB, True)
    # No memslot at all (the attribute is private there too).
    attrs(td, 256 * MB, PAGE, True)
    assert access(td, 256 * MB)["exit"] == mem_fault(256 * MB, True)
    assert td.stats()["mmio_sptes"] == 0
    assert ops(td)[AUG] == 0
    assert_clean(td)


def test_shared_mmio_exit_reports_the_gpa_without_the_shared_bit() -> None:
    """§1.3: KVM strips the shared bit before memslot lookup and before exits to userspace."""
    td, _ = make_td()
    res = access(td, S47 | 64 * MB, PAGE, "write")
    assert res["exit"]["reason"] == MMIO
    assert res["exit"]["gpa"] == 64 * MB
    assert_clean(td)


def test_private_pages_are_4k_shared_may_be_huge() -> None:
    td, _ = make_td(huge_host=True)
    assert accept(td, 0, 2 * MB)["accepted"] == 512
    res = access(td, S47 | 2 * MB, 2 * MB, "write")
    assert res["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    roots = roots_by_role(td)
    assert roots["mirror"]["sptes"] == {"4k": 512, "2m": 0, "1g": 0}
    assert roots["direct"]["sptes"] == {"4k": 0, "2m": 1, "1g": 0}
    assert_clean(td)


# -- S-EPT operations --------------------------------------------------------------------------
@pytest.mark.parametrize(("levels", "tables"), [(4, 3), (5, 4)])
def test_sept_add_per_mirror_table_and_aug_per_page(levels: int, tables: int) -> None:
    td, _ = make_td(levels, private=4 * MB)
    assert accept(td, 0)["accepted"] == 1
    assert diff(ops(td), {}) == {SEPT_ADD: tables, AUG: 1, ACCEPT: 1}
    before = ops(td)
    assert accept(td, PAGE, 511 * PAGE)["accepted"] == 511  # same leaf table
    assert diff(ops(td), before) == {AUG: 511, ACCEPT: 511}
    before = ops(td)
    res = access(td, 2 * MB)  # next 2 MiB region: one more leaf table, page left PENDING
    assert res["exit"] == mem_fault(2 * MB, True, size=0)
    assert diff(ops(td), before) == {SEPT_ADD: 1, AUG: 1}
    page_tables = td.stats()["page_tables"]
    assert page_tables == 1 + tables + 1  # mirror root + its chain + the second leaf table
    assert_clean(td)


def test_removal_is_block_track_remove_wbinvd_per_page_and_keeps_tables() -> None:
    td, _ = make_td()
    accept(td, 0, 8 * PAGE)
    before, tables = ops(td), td.stats()["page_tables"]
    zap = attrs(td, 0, 8 * PAGE, False)["zap"]
    assert zap["sptes_zapped"]["mirror"]["4k"] == 8
    assert zap["tables_freed"] == 0
    # One TRACK per removed page (the epoch must move between BLOCK and REMOVE); the remote
    # flush itself is an INVEPT of the shared EPT (tdx_flush_tlb_all), no TRACK.
    assert diff(ops(td), before) == {BLOCK: 8, TRACK: 8, REMOVE: 8, WBINVD: 8}
    assert zap["tlb_flushes"] == 1
    # Leaves only: the S-EPT tables stay until the TD is torn down.
    assert td.stats()["page_tables"] == tables
    assert ops(td)[RECLAIM] == 0
    # Order, per removed page: BLOCK, then TRACK, then REMOVE, then WBINVD.
    recent = td.tdx_state()["recent"]
    for gfn in range(8):
        seq = [
            e["op"]
            for e in recent
            if e["gfn_start"] <= gfn < e["gfn_end"] and e["op"] in (BLOCK, TRACK, REMOVE, WBINVD)
        ]
        assert seq[:4] == [BLOCK, TRACK, REMOVE, WBINVD], (gfn, seq)
    assert td.tdx_state()["epoch"] >= 8
    assert_clean(td)


def test_destroy_reclaims_every_leaf_then_every_sept_table() -> None:
    """§5.9: after the HKID is released each private leaf is reclaimed, then each S-EPT table
    page (free_external_spt) — leaf before table; no BLOCK/TRACK/REMOVE needed."""
    td, _ = make_td()
    accept(td, 0, 4 * PAGE)
    before = ops(td)
    tables = before[SEPT_ADD]
    td.apply(parse("destroy", {}))
    assert td.tdx_state()["hkid_assigned"] is False
    assert diff(ops(td), before) == {RECLAIM: 4 + tables}
    reclaims = [e for e in td.tdx_state()["recent"] if e["op"] == RECLAIM]
    spans = [e["gfn_end"] - e["gfn_start"] for e in reclaims]
    leaf_positions = [i for i, e in enumerate(reclaims) if e["gfn_end"] - e["gfn_start"] <= 4]
    table_positions = [i for i, e in enumerate(reclaims) if e["gfn_end"] - e["gfn_start"] >= 512]
    assert table_positions, spans
    assert max(leaf_positions) < min(table_positions), spans


# -- pending and accept ------------------------------------------------------------------------
def test_pending_page_exits_until_accepted() -> None:
    td, _ = make_td()
    res = access(td, 0, PAGE, "write")
    assert res["exit"] == mem_fault(0, True, size=0)
    assert access(td, 0)["exit"] == mem_fault(0, True, size=0)
    assert ops(td)[AUG] == 1  # the mirror entry exists: no second AUG
    assert td.tdx_state()["accepted_pages"] == 0
    assert accept(td, 0) == {"accepted": 1, "reaccepted": 0, "exit": None}
    assert access(td, 0, PAGE, "write")["exit"] is None
    assert ops(td)[AUG] == 1
    assert_clean(td)


def test_zapped_accepted_page_needs_reaccept() -> None:
    td, _ = make_td()
    accept(td, 0, 4 * PAGE)
    zap = td.apply(parse("zap", {"scope": "range", "gpa": PAGE, "size": PAGE, "roots": "private"}))
    assert zap["sptes_zapped"]["mirror"]["4k"] == 1
    assert td.tdx_state()["pending_reaccept_pages"] == 1
    assert access(td, 0)["exit"] is None  # untouched neighbours stay accepted
    assert access(td, PAGE)["exit"] == mem_fault(PAGE, True, size=0)  # re-AUGed, PENDING
    assert access(td, PAGE)["exit"] == mem_fault(PAGE, True, size=0)
    assert accept(td, 0, 4 * PAGE) == {"accepted": 1, "reaccepted": 1, "exit": None}
    assert access(td, PAGE)["exit"] is None
    st = td.tdx_state()
    assert (st["reaccepts"], st["pending_reaccept_pages"], st["accepted_pages"]) == (1, 0, 4)
    assert td.stats()["tdx_reaccepts"] == 1
    assert_clean(td)


def test_accept_stops_at_the_first_exit_after_accepting_the_pages_before_it() -> None:
    td, _ = make_td(private=3 * PAGE)
    res = accept(td, 0, 5 * PAGE)
    assert res == {"accepted": 3, "reaccepted": 0, "exit": mem_fault(3 * PAGE, True)}
    assert td.tdx_state()["accepted_pages"] == 3
    assert access(td, 0, 3 * PAGE)["exit"] is None
    assert_clean(td)


def test_accept_bad_input() -> None:
    td, _ = make_td()
    expect_errno(errno.EINVAL, apply_json, td, "accept", {"vcpu": 0, "gpa": S47, "size": PAGE})
    expect_errno(errno.EINVAL, apply_json, td, "accept", {"vcpu": 0, "gpa": 0x800, "size": PAGE})
    expect_errno(errno.EINVAL, apply_json, td, "accept", {"vcpu": 0, "gpa": 0, "size": 0})
    vm = Vm.create(1, 1)
    expect_errno(errno.EINVAL, apply_json, vm, "accept", {"vcpu": 0, "gpa": 0, "size": PAGE})
    assert ops(td)[ACCEPT] == 0


# -- conversions on a TD -----------------------------------------------------------------------
def test_to_shared_zaps_exactly_the_converted_private_pages() -> None:
    """§3.5 / §5.5: converting to shared removes the range's private pages from the S-EPT and
    nothing else — every other accepted page would need a re-accept the guest never asked for."""
    td, _ = make_td()
    accept(td, 0, 16 * PAGE)
    before = ops(td)
    zap = attrs(td, 0, PAGE, False)["zap"]
    assert zap["cause"] == "attributes"
    assert zap["sptes_zapped"]["mirror"]["4k"] == 1
    assert zap["sptes_zapped_total"] == 1
    assert diff(ops(td), before)[REMOVE] == 1
    assert td.tdx_state()["accepted_pages"] == 15
    assert access(td, PAGE, 15 * PAGE, "write")["exit"] is None
    assert access(td, S47)["exit"] is None  # gfn 0 is shared now
    assert_clean(td)


def test_to_private_zaps_the_shared_alias_including_huge_leaves() -> None:
    td, _ = make_td(private=0, huge_host=True)
    assert access(td, S47, 2 * MB, "write")["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    before = ops(td)
    zap = attrs(td, PAGE, PAGE, True)["zap"]
    assert zap["cause"] == "attributes"
    assert zap["sptes_zapped"]["direct"]["2m"] == 1
    # The unmap is the changed range; the 2M leaf intersects it, so it goes whole.
    assert (zap["gfn_start"], zap["gfn_end"]) == (1, 2)
    assert zap["sptes_zapped"]["mirror"] == {"4k": 0, "2m": 0, "1g": 0}
    assert diff(ops(td), before) == {}  # no S-EPT removal, no TRACK
    assert access(td, S47 | PAGE)["exit"] == mem_fault(PAGE, False)
    res = access(td, S47, PAGE)
    assert res["exit"] is None and res["levels"] == {"4k": 1, "2m": 0, "1g": 0}
    assert_clean(td)


def test_private_and_shared_views_and_contents_across_conversions() -> None:
    td, _ = make_td()
    td.apply(parse("host_write", {"userspace_addr": HVA, "data": (b"\x11" * 16).hex()}))
    accept(td, 0)
    assert load(td, 0, 16) == {"data": bytes(16).hex()}  # an accepted page starts zeroed
    store(td, 0, b"\xaa" * 16)
    assert load(td, 0, 16) == {"data": (b"\xaa" * 16).hex()}
    assert vm_host(td) == (b"\x11" * 16).hex()  # private stores never reach host memory

    attrs(td, 0, PAGE, False)
    assert load(td, S47, 16) == {"data": (b"\x11" * 16).hex()}  # shared view = host bytes
    assert load(td, 0, 16) == {"exit": mem_fault(0, True)}  # private view is gone
    store(td, S47 | 8, b"\x22" * 8)
    assert vm_host(td) == (b"\x11" * 8 + b"\x22" * 8).hex()

    attrs(td, 0, PAGE, True)
    assert load(td, 0, 16) == {"exit": mem_fault(0, True, size=0)}
    assert accept(td, 0) == {"accepted": 1, "reaccepted": 1, "exit": None}
    # The S-EPT removal cleared the page: the guest does not get its old private data back.
    assert load(td, 0, 16) == {"data": bytes(16).hex()}
    assert vm_host(td) == (b"\x11" * 8 + b"\x22" * 8).hex()
    assert_clean(td)


def vm_host(vm: Vm) -> str:
    return vm.host_read(HVA, 16)["data"]


# -- guest_memfd on a TD -----------------------------------------------------------------------
def test_punch_hole_removes_private_pages_and_guest_reads_zeros_after_reaccept() -> None:
    td, fd = make_td()
    accept(td, 0, 8 * PAGE)
    store(td, 2 * PAGE, b"\xcd" * 8)
    before = ops(td)
    res = td.apply(
        parse("gmem_fallocate", {"fd": fd, "mode": "punch_hole", "offset": 0, "len": 4 * PAGE})
    )
    assert res["freed"] == 4
    zap = res["zap"]
    assert zap["cause"] == "punch_hole"
    assert zap["sptes_zapped"] == {
        "direct": {"4k": 0, "2m": 0, "1g": 0},
        "mirror": {"4k": 4, "2m": 0, "1g": 0},
        "4k": 4,
        "2m": 0,
        "1g": 0,
    }
    d = diff(ops(td), before)
    assert (d[BLOCK], d[REMOVE], d[WBINVD]) == (4, 4, 4)
    assert_clean(td)
    assert load(td, 2 * PAGE, 8) == {"exit": mem_fault(2 * PAGE, True, size=0)}
    assert accept(td, 0, 8 * PAGE) == {"accepted": 4, "reaccepted": 4, "exit": None}
    assert load(td, 2 * PAGE, 8) == {"data": bytes(8).hex()}
    assert_clean(td)


def test_gmem_close_removes_private_pages_and_later_private_faults_exit() -> None:
    td, fd = make_td()
    accept(td, 0, 3 * PAGE)
    access(td, S47 | 2 * MB, 2 * PAGE)
    zap = td.apply(parse("gmem_close", {"fd": fd}))["zap"]
    assert zap["cause"] == "gmem_close"
    # On a TD the PRIVATE filter selects the mirror root only (§2.7.1).
    assert zap["sptes_zapped"] == {
        "direct": {"4k": 0, "2m": 0, "1g": 0},
        "mirror": {"4k": 3, "2m": 0, "1g": 0},
        "4k": 3,
        "2m": 0,
        "1g": 0,
    }
    assert td.stats()["shared_pages_4k"] == 2
    assert ops(td)[REMOVE] == 3
    assert_clean(td)
    assert access(td, 0)["exit"] == mem_fault(0, True)
    assert accept(td, PAGE)["exit"] == mem_fault(PAGE, True)
    assert access(td, S47 | 2 * MB, 4 * PAGE)["exit"] is None
    assert_clean(td)


# -- memslot delete / move on a TD -------------------------------------------------------------
def test_td_slot_delete_zaps_slot_leafs_private_and_shared_and_keeps_the_mirror_root() -> None:
    td, _ = make_td()
    quirk = {q["name"]: q for q in td.quirks()["quirks"]}["KVM_X86_QUIRK_SLOT_ZAP_ALL"]
    assert quirk["enabled"] is True and quirk["applicable"] is False
    accept(td, 0, 5 * PAGE)
    access(td, S47 | 2 * MB, 7 * PAGE, "write")
    roots = roots_by_role(td)
    tables = td.stats()["page_tables"]
    before = ops(td)
    zap = delete_slot(td)["zap"]
    assert zap["path"] == "zap_slot_leafs" and zap["cause"] == "memslot_delete"
    assert zap["sptes_zapped"]["mirror"]["4k"] == 5
    assert zap["sptes_zapped"]["direct"]["4k"] == 7
    assert zap["roots_invalidated"] == 0 and zap["tables_freed"] == 0
    assert zap["tlb_flushes"] == 1
    assert (zap["gfn_start"], zap["gfn_end"]) == (0, 2048)
    d = diff(ops(td), before)
    assert (d[BLOCK], d[REMOVE], d[WBINVD]) == (5, 5, 5)
    after = roots_by_role(td)
    for role in ("mirror", "direct"):
        assert after[role]["id"] == roots[role]["id"]
        assert after[role]["valid"] is True and after[role]["obsolete"] is False
        assert after[role]["sptes"] == {"4k": 0, "2m": 0, "1g": 0}
    assert td.stats()["page_tables"] == tables  # non-leaf tables are left in place
    assert td.stats()["zaps_slot_leafs"] == 1 and td.stats()["zaps_all_fast"] == 0
    assert_clean(td)
    # The slot is gone: a private access exits with MEMORY_FAULT, never MMIO.
    assert access(td, 0)["exit"] == mem_fault(0, True)


def test_td_slot_move_takes_slot_leafs_and_keeps_the_mirror_root() -> None:
    td, _ = make_td()
    accept(td, 0, 2 * PAGE)
    td.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 1,
                "flags": 0,
                "guest_phys_addr": 64 * MB,
                "memory_size": 2 * MB,
                "userspace_addr": HVA + 64 * MB,
            },
        ),
    )
    access(td, S47 | 64 * MB, 2 * MB, "write")
    mirror_id = roots_by_role(td)["mirror"]["id"]
    res = td.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 1,
                "flags": 0,
                "guest_phys_addr": 128 * MB,
                "memory_size": 2 * MB,
                "userspace_addr": HVA + 64 * MB,
            },
        ),
    )
    assert res["change"] == "move"
    zap = res["zap"]
    assert zap["path"] == "zap_slot_leafs" and zap["cause"] == "memslot_move"
    assert zap["sptes_zapped_total"] == 512
    assert (zap["gfn_start"], zap["gfn_end"]) == (64 * MB >> 12, 66 * MB >> 12)
    roots = roots_by_role(td)
    assert roots["mirror"]["id"] == mirror_id and roots["mirror"]["valid"]
    assert roots["mirror"]["sptes"]["4k"] == 2
    assert access(td, 0, 2 * PAGE)["exit"] is None  # private pages untouched: no re-accept
    assert_clean(td)


def test_gmem_slot_cannot_be_moved() -> None:
    td, fd = make_td()
    accept(td, 0)
    for flags, extra in ((GMEM, {"guest_memfd": fd, "guest_memfd_offset": 0}), (0, {})):
        expect_errno(
            errno.EINVAL,
            apply_json,
            td,
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": flags,
                "guest_phys_addr": 256 * MB,
                "memory_size": 8 * MB,
                "userspace_addr": HVA,
                **extra,
            },
        )
    assert td.memslot(0)["guest_phys_addr"] == 0
    assert access(td, 0)["exit"] is None
    assert_clean(td)


# -- explicit zaps ---------------------------------------------------------------------------
@pytest.mark.parametrize("roots", ["private", "both"])
def test_explicit_zap_all_of_the_private_root_is_eperm(roots: str) -> None:
    td, _ = make_td()
    accept(td, 0, 2 * PAGE)
    before, events = ops(td), len(td.zap_events())
    expect_errno(EPERM, apply_json, td, "zap", {"scope": "all", "roots": roots})
    assert ops(td) == before and len(td.zap_events()) == events
    assert roots_by_role(td)["mirror"]["sptes"]["4k"] == 2
    assert_clean(td)


def test_shared_zap_all_never_touches_the_mirror_root() -> None:
    """§2.7.2 / §5.4: fast zaps invalidate direct roots only; TDP-MMU roots do not use the MMU
    generation (kvm-memslots.md §5), so the mirror root stays valid and current."""
    td, _ = make_td()
    accept(td, 0, 4 * PAGE)
    access(td, S47 | 2 * MB, 4 * PAGE)
    mirror = roots_by_role(td)["mirror"]
    before = ops(td)
    zap = td.apply(parse("zap", {"scope": "all", "roots": "shared"}))
    assert zap["path"] == "zap_all_fast"
    assert zap["roots_invalidated"] == 1
    assert zap["sptes_zapped"]["mirror"] == {"4k": 0, "2m": 0, "1g": 0}
    assert diff(ops(td), before).get(REMOVE, 0) == 0
    after = roots_by_role(td)["mirror"]
    assert after["id"] == mirror["id"]
    assert after["valid"] is True and after["obsolete"] is False
    assert after["sptes"]["4k"] == 4
    assert access(td, 0, 4 * PAGE, "write")["exit"] is None  # still accepted
    assert access(td, S47 | 2 * MB, 4 * PAGE)["exit"] is None  # a new direct root
    assert_clean(td)


# -- what does not apply to a TD ---------------------------------------------------------------
def test_smm_address_space_is_einval() -> None:
    td, _ = make_td()
    expect_errno(
        errno.EINVAL,
        apply_json,
        td,
        "set_user_memory_region",
        {
            "slot": (1 << 16) | 1,
            "flags": 0,
            "guest_phys_addr": 64 * MB,
            "memory_size": MB,
            "userspace_addr": HVA + 64 * MB,
        },
    )
    assert len(td.memslots()) == 1


@pytest.mark.parametrize("flags", [READONLY, READONLY | GMEM])
def test_readonly_slot_is_einval(flags: int) -> None:
    td, fd = make_td(private=0)
    args = {
        "slot": 2,
        "flags": flags,
        "guest_phys_addr": 64 * MB,
        "memory_size": MB,
        "userspace_addr": HVA + 64 * MB,
    }
    if flags & GMEM:
        args.update(guest_memfd=fd, guest_memfd_offset=0)
    expect_errno(errno.EINVAL, apply_json, td, "set_user_memory_region", args)
    assert len(td.memslots()) == 1


def test_slot_zap_all_quirk_applies_only_to_default_vms() -> None:
    def applicable(vm: Vm) -> bool:
        q = {q["name"]: q for q in vm.quirks()["quirks"]}["KVM_X86_QUIRK_SLOT_ZAP_ALL"]
        return bool(q["applicable"])

    assert applicable(Vm.create(TDX, 1)) is False
    assert applicable(Vm.create(DEFAULT, 1)) is True
    assert Vm.create(TDX, 1).info()["slot_zap_all_applies"] is False


# -- the rejected design -------------------------------------------------------------------------
def _uaf_scenario(policy: str) -> tuple[Vm, dict[str, Any]]:
    td, fd = make_td()
    accept(td, 0, 8 * PAGE)
    access(td, S47 | 2 * MB, 8 * PAGE, "write")
    assert td.apply(parse("set_zap_policy", {"policy": policy})) == {}
    zap = delete_slot(td)["zap"]
    td.apply(parse("gmem_fallocate", {"fd": fd, "mode": "punch_hole", "offset": 0, "len": 8 * MB}))
    return td, zap


def test_zap_all_shared_only_then_punch_is_a_use_after_free() -> None:
    td, zap = _uaf_scenario("zap_all_shared_only")
    assert zap["sptes_zapped"]["mirror"] == {
        "4k": 0,
        "2m": 0,
        "1g": 0,
    }  # private pages stayed mapped
    report = td.audit()
    assert report["ok"] is False
    rules = {v["rule"] for v in report["violations"]}
    assert "no_freed_page_mapped" in rules, rules


def test_kvm_policy_delete_then_punch_stays_clean() -> None:
    td, zap = _uaf_scenario("kvm")
    assert zap["path"] == "zap_slot_leafs"
    assert zap["sptes_zapped"]["mirror"]["4k"] == 8
    assert zap["sptes_zapped"]["direct"]["4k"] == 8
    assert_clean(td)


def test_unknown_zap_policy_is_einval() -> None:
    td, _ = make_td()
    expect_errno(errno.EINVAL, apply_json, td, "set_zap_policy", {"policy": "zap_all"})
    assert td.info()["zap_policy"] == "kvm"


# -- regression cases from the engine review --------------------------------------------------
def test_td_punch_of_file_bound_to_two_slots_is_one_flush_and_one_zap_event() -> None:
    td, fd = kit.td_with_gmem(kit.M2, slots=2)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=kit.M2)))
    st0, events0 = td.stats(), len(td.zap_events())
    r = td.apply(parse("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=kit.M2)))
    st1 = td.stats()
    assert st1["remote_tlb_flush_requests"] - st0["remote_tlb_flush_requests"] == 1
    assert st1["tdx_tdh_mem_track"] - st0["tdx_tdh_mem_track"] == 512
    assert st1["tdx_tdh_mem_page_remove"] - st0["tdx_tdh_mem_page_remove"] == 512
    zap = r["zap"]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (0, 512, 512)
    assert len(td.zap_events()) - events0 == 1
    assert st1["pages_4k"] == 0 and st1["tdx_accepted_pages"] == 0
    assert td.audit()["ok"] is True


def test_td_shared_only_zap_adds_no_track() -> None:
    td, _ = kit.td_with_gmem(kit.MB)
    kit.attrs(td, 0, kit.MB, False)
    kit.access(td, kit.S47)  # one shared leaf through the direct root
    ops0, st0 = td.tdx_state()["ops"], td.stats()
    zap = td.apply(parse("host_discard", dict(userspace_addr=kit.HVA, len=kit.PAGE)))["zap"]
    assert zap["sptes_zapped_total"] == 1 and zap["sptes_zapped"]["direct"]["4k"] == 1
    st1 = td.stats()
    assert td.tdx_state()["ops"] == ops0  # no TDH.MEM.TRACK (nor any other SEAMCALL)
    assert st1["remote_tlb_flush_requests"] - st0["remote_tlb_flush_requests"] == 1
    assert st1["tdx_tdh_mem_track"] == st0["tdx_tdh_mem_track"]


def test_td_private_zap_still_costs_one_track() -> None:
    td, _ = kit.td_with_gmem(2 * kit.MB)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=2 * kit.PAGE)))
    ops0 = td.tdx_state()["ops"]
    kit.attrs(td, 0, kit.PAGE, False)  # to shared: S-EPT BLOCK/TRACK/REMOVE of one page
    ops1 = td.tdx_state()["ops"]
    assert ops1[kit.TRACK] - ops0[kit.TRACK] == 1
    assert ops1[kit.REMOVE] - ops0[kit.REMOVE] == 1


def test_accept_every_other_page_then_punch_is_consistent() -> None:
    n = 1 << 14
    td, fd = kit.td_with_gmem(n * kit.PAGE)
    for g in range(0, n, 2):
        td.apply(parse("accept", dict(vcpu=0, gpa=g * kit.PAGE, size=kit.PAGE)))
    state = td.tdx_state()
    assert state["accepted_pages"] == n // 2
    assert state["ops"]["TDH.MEM.PAGE.AUG"] == n // 2
    assert td.stats()["private_pages_4k"] == n // 2
    zap = td.apply(
        parse("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=n * kit.PAGE))
    )["zap"]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (0, n, n // 2)
    state = td.tdx_state()
    assert state["accepted_pages"] == 0
    assert state["pending_reaccept_pages"] == n // 2
    assert state["ops"][kit.REMOVE] == n // 2 and state["ops"][kit.TRACK] == n // 2
    s = td.stats()
    assert (s["pages_4k"], s["private_pages_4k"], s["tdx_accepted_pages"]) == (0, 0, 0)
    assert td.audit()["ok"] is True
    # A later accept of a punched (previously accepted) page and a never-accepted one.
    assert td.apply(parse("accept", dict(vcpu=0, gpa=0, size=2 * kit.PAGE))) == {
        "accepted": 2,
        "reaccepted": 1,
        "exit": None,
    }
    assert td.apply(parse("load", dict(vcpu=0, gpa=0, len=1)))["data"] == "00"


def test_reaccept_zeroes_pages_in_every_slot_of_the_range() -> None:
    td, _ = kit.td_with_gmem(kit.M2, slots=2)  # two adjacent gmem slots, 1 MiB each
    a, b = kit.MB - kit.PAGE, kit.MB  # last page of slot 0, first page of slot 1
    td.apply(parse("accept", dict(vcpu=0, gpa=a, size=2 * kit.PAGE)))
    td.apply(parse("store", dict(vcpu=0, gpa=a, data="aa")))
    td.apply(parse("store", dict(vcpu=0, gpa=b, data="bb")))
    kit.attrs(td, a, 2 * kit.PAGE, False)  # to shared: S-EPT REMOVE
    kit.attrs(td, a, 2 * kit.PAGE, True)  # back to private
    r = td.apply(parse("accept", dict(vcpu=0, gpa=a, size=2 * kit.PAGE)))
    assert r == {"accepted": 2, "reaccepted": 2, "exit": None}
    assert td.apply(parse("load", dict(vcpu=0, gpa=a, len=1)))["data"] == "00"
    assert td.apply(parse("load", dict(vcpu=0, gpa=b, len=1)))["data"] == "00"


def test_mirror_spte_never_changes_present_to_present() -> None:
    td, _ = kit.td_with_gmem(kit.MB)
    assert td.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=kit.PAGE))) == {
        "gpa": kit.PAGE,
        "size": 0,
    }
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=kit.PAGE)))
    raw = kit.mirror_leaf_raw(td, 0)
    r = kit.access(td, 0)
    assert (r["mapped"], r["spurious"]) == (0, 1)
    assert kit.mirror_leaf_raw(td, 0) == raw
    kit.access(td, 0, kit.PAGE, "write")
    assert kit.mirror_leaf_raw(td, 0) == raw


def test_td_exec_from_shared_gpa_kills_the_vm_with_eio() -> None:
    td, fd = kit.td_with_gmem(kit.MB)
    kit.attrs(td, 0, kit.MB, False)
    with pytest.raises(KvmError) as info:
        kit.access(td, kit.S47 | 0x2000, kit.PAGE, "exec")
    assert info.value.errno == errno.EIO
    assert info.value.state_changed is True
    later: list[tuple[str, dict[str, Any]]] = [
        ("access", dict(vcpu=0, gpa=kit.S47, size=kit.PAGE)),
        ("accept", dict(vcpu=0, gpa=0, size=kit.PAGE)),
        ("set_memory_attributes", dict(address=0, size=kit.PAGE, attributes=kit.PRIVATE)),
        ("create_guest_memfd", dict(size=kit.PAGE)),
        ("gmem_fallocate", dict(fd=fd, mode="punch_hole", offset=0, len=kit.PAGE)),
        ("set_user_memory_region", dict(slot=0, flags=kit.GMEM, memory_size=0)),
    ]
    for op, args in later:
        with pytest.raises(KvmError) as info:
            td.apply(parse(op, args))
        assert info.value.errno == errno.EIO, op


def test_the_seamcall_record_keeps_exactly_the_latest_256_operations() -> None:
    """`recent` (GET /v1/vms/{vm}/tdx) is a ring of the latest 256 SEAMCALL records, oldest
    first: after more than 256, the oldest are gone and the newest is last."""
    td, _ = make_td()
    for p in range(160):  # at least PAGE.AUG + PAGE.ACCEPT each: over 256 records
        accept(td, p * PAGE)
    recent = td.tdx_state()["recent"]
    assert len(recent) == 256
    assert recent[-2:] == [
        {"op": AUG, "gfn_start": 159, "gfn_end": 160},
        {"op": ACCEPT, "gfn_start": 159, "gfn_end": 160},
    ]
    # Each accept of page p left AUG then ACCEPT of [p, p + 1): the ring starts mid-history.
    assert recent[0]["gfn_start"] > 0
    assert [e["gfn_start"] for e in recent] == sorted(e["gfn_start"] for e in recent)
