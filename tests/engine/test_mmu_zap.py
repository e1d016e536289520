"""Memslot DELETE / MOVE zaps: "zap all" (KVM_X86_QUIRK_SLOT_ZAP_ALL on a DEFAULT VM) against
"zap only the slot's leaf SPTEs" (quirk disabled, or any other VM type), with exact counts.
kvm-memslots.md §2.1 (V21 ordering), §3.2, §3.3, §4, §5, §7."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse
from app.engine.roots import ZapAcc
from app.engine.zap import ZapEvent

from .mmu import check, pages, region

U = 0x7F00_0000_0000
KB4, MB, GB = 1 << 12, 1 << 20, 1 << 30
DEFAULT, SW_PROTECTED = 0, 1
QUIRK_SLOT_ZAP_ALL = 0x80
MAX_GFN = (1 << 40) - 1


def delete(vm: Vm, slot: int) -> dict:
    return region(vm, slot, 0, 0, 0)


def access(vm: Vm, gpa: int, size: int = KB4, kind: str = "write", vcpu: int = 0) -> dict:
    return vm.apply(parse("access", dict(vcpu=vcpu, gpa=gpa, size=size, access=kind)))


def load(vm: Vm, gpa: int, n: int, vcpu: int = 0) -> dict:
    return vm.apply(parse("load", dict(vcpu=vcpu, gpa=gpa, len=n)))


def store(vm: Vm, gpa: int, data: bytes, vcpu: int = 0) -> dict:
    return vm.apply(parse("store", dict(vcpu=vcpu, gpa=gpa, data=data.hex())))


def disable_quirk(vm: Vm, cap: str = "KVM_CAP_DISABLE_QUIRKS2") -> None:
    vm.apply(parse("enable_cap", dict(cap=cap, flags=0, args=[QUIRK_SLOT_ZAP_ALL, 0, 0, 0])))


def leaf(vm: Vm, gpa: int) -> dict | None:
    for root in vm.translate(gpa)["roots"]:
        last = root["walk"][-1]
        if root["valid"] and last.get("present") and last.get("leaf"):
            return last
    return None


def layout(vm_type: int = DEFAULT, quirk: bool = True) -> Vm:
    """slot 0: [0, 4M) at 4K (1024 leaves, two L1 tables);
    slot 1: [1G, 1G+6M), THP on its first 4M: two 2M leaves and 512 4K leaves (one L1 table);
    slot 2: [2G, 2G+2M), never touched.
    vCPU 0 touches slot 0, vCPU 1 slot 1.  Tables: root, L3, L2 (GB 0), 2×L1, L2 (GB 1), L1."""
    vm = Vm.create(vm_type, 2)
    if not quirk:
        disable_quirk(vm)
    vm.apply(parse("host_advise", dict(userspace_addr=U + GB, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, U)
    region(vm, 1, GB, 6 * MB, U + GB)
    region(vm, 2, 2 * GB, 2 * MB, U + 2 * GB)
    assert access(vm, 0, 4 * MB, vcpu=0)["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    assert access(vm, GB, 6 * MB, vcpu=1)["levels"] == {"4k": 512, "2m": 2, "1g": 0}
    assert pages(vm) == (1536, 2, 0)
    assert vm.stats()["page_tables"] == 7
    check(vm)
    return vm


ZAP_SLOT_VMS = [
    pytest.param(DEFAULT, False, id="default-quirk-disabled"),
    pytest.param(SW_PROTECTED, True, id="sw-protected-quirk-enabled"),
    pytest.param(SW_PROTECTED, False, id="sw-protected-quirk-disabled"),
]


def change(op: str, vm: Vm, slot: int) -> dict:
    """DELETE the slot, or MOVE it 64 GiB up (same HVA and size)."""
    if op == "delete":
        return delete(vm, slot)
    s = vm.memslot(slot)
    return region(
        vm, slot, s["guest_phys_addr"] + 64 * GB, s["memory_size"], s["userspace_addr"], s["flags"]
    )


# =========================================================================== zap all
@pytest.mark.parametrize("op", ["delete", "move"])
def test_zap_all_fast_drops_every_spte_of_the_vm(op: str) -> None:
    vm = layout()
    before = vm.stats()
    old_root = vm.roots()[0]["id"]
    r = change(op, vm, 1)
    assert r["change"] == op
    z = r["zap"]
    assert z["path"] == "zap_all_fast"
    assert z["cause"] == f"memslot_{op}"
    assert z["roots_invalidated"] == 1
    # Every leaf of the VM, slot 0 included, not just the slot's.
    assert (z["sptes_zapped"]["4k"], z["sptes_zapped"]["2m"], z["sptes_zapped"]["1g"]) == (
        1536,
        2,
        0,
    )
    assert z["sptes_zapped_total"] == 1538
    # No remote TLB flush with only the TDP MMU (§4.3): vCPUs flush locally on the new root.
    assert z["tlb_flushes"] == 0
    after = vm.stats()
    assert after["remote_tlb_flush_requests"] == before["remote_tlb_flush_requests"]
    assert after["remote_tlb_flush"] == before["remote_tlb_flush"]
    assert after["mmu_shadow_zapped"] == 0
    assert pages(vm) == (0, 0, 0)
    assert after["zaps_all_fast"] == 1 and after["zaps_slot_leafs"] == 0
    # All non-root tables are gone now; at most the (empty, invalid) old root lingers until
    # the vCPUs that hold it reload (§5 "what is zapped now vs later").
    lingering = [r for r in vm.roots() if r["id"] == old_root]
    for root in lingering:
        assert root["valid"] is False
        assert root["sptes"] == {"4k": 0, "2m": 0, "1g": 0}
    assert after["page_tables"] == len(lingering)
    assert z["tables_freed"] == before["page_tables"] - after["page_tables"]
    assert leaf(vm, 0) is None
    assert vm.memslot(0)["mapped"]["total"] == 0
    check(vm)


@pytest.mark.parametrize("op", ["delete", "move"])
def test_after_zap_all_vcpus_reload_a_new_root_and_refault(op: str) -> None:
    vm = layout()
    old_root = vm.roots()[0]["id"]
    change(op, vm, 1)
    r = access(vm, 0, 4 * MB, vcpu=0)
    assert (r["mapped"], r["refaults"], r["spurious"]) == (1024, 1024, 0)
    assert vm.stats()["refaults"] == 1024
    valid = [x for x in vm.roots() if x["valid"]]
    assert len(valid) == 1 and valid[0]["id"] != old_root
    views = {v["id"]: v for v in vm.vcpus_view()}
    assert views[0]["roots"]["direct"] == valid[0]["id"]
    # vCPU 0 had to drop its obsolete root and load the new one.
    assert views[0]["stats"]["root_reloads"] == 1
    # vCPU 1 has not run since: it reloads when it next touches memory.
    assert views[1]["stats"]["root_reloads"] == 0
    access(vm, 0, KB4, vcpu=1)
    views = {v["id"]: v for v in vm.vcpus_view()}
    assert views[1]["roots"]["direct"] == valid[0]["id"]
    assert views[1]["stats"]["root_reloads"] == 1
    check(vm)


def test_zap_all_kicks_every_running_vcpu() -> None:
    vm = layout()
    z = delete(vm, 2)["zap"]
    assert z["vcpu_kicks"] == 2


def test_zap_all_happens_even_when_the_deleted_slot_had_nothing_mapped() -> None:
    vm = layout()
    z = delete(vm, 2)["zap"]  # slot 2 was never touched
    assert z["path"] == "zap_all_fast"
    assert z["sptes_zapped_total"] == 1538
    assert pages(vm) == (0, 0, 0)
    assert vm.stats()["remote_tlb_flush_requests"] == 0
    check(vm)


def test_zap_all_is_still_reported_when_the_vm_has_no_root() -> None:
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 2 * MB, U)
    z = delete(vm, 0)["zap"]
    assert z["path"] == "zap_all_fast"
    assert (z["sptes_zapped_total"], z["roots_invalidated"], z["tlb_flushes"]) == (0, 0, 0)
    assert len(vm.zap_events()) == 1


def test_every_zap_event_has_the_fixed_shape_in_its_order() -> None:
    bare = Vm.create(DEFAULT, 1)
    region(bare, 0, 0, 2 * MB, U)
    vm = layout()
    events = [delete(bare, 0)["zap"], delete(vm, 2)["zap"], *vm.zap_events(), *bare.zap_events()]
    shape = list(ZapEvent.__annotations__)
    empty = ZapAcc().by_level()  # a zap that took no leaf still names every role and level
    assert list(events[0]["sptes_zapped"].items()) == list(empty.items())
    for ev in events:
        assert list(ev) == shape
        assert list(ev["sptes_zapped"]) == list(empty)
        for role in ("direct", "mirror"):
            assert list(ev["sptes_zapped"][role]) == ["4k", "2m", "1g"]
    # The answer is the caller's own copy: changing it leaves the VM's log as it was.
    events[1]["sptes_zapped"]["direct"]["4k"] = -1
    assert vm.zap_events()[0]["sptes_zapped"]["direct"]["4k"] != -1


def test_quirk_is_read_at_each_delete() -> None:
    vm = layout()
    assert delete(vm, 2)["zap"]["path"] == "zap_all_fast"
    access(vm, 0, 4 * MB, vcpu=0)
    access(vm, GB, 6 * MB, vcpu=1)
    disable_quirk(vm)  # after vCPUs ran: affects the next delete
    z = delete(vm, 1)["zap"]
    assert z["path"] == "zap_slot_leafs"
    assert pages(vm) == (1024, 0, 0)
    check(vm)


def test_legacy_disable_quirks_cap_also_disables_zap_all() -> None:
    vm = layout()
    disable_quirk(vm, "KVM_CAP_DISABLE_QUIRKS")
    assert delete(vm, 2)["zap"]["path"] == "zap_slot_leafs"
    assert pages(vm) == (1536, 2, 0)


def test_create_and_flags_only_never_zap() -> None:
    vm = layout()
    r = region(vm, 3, 3 * GB, 2 * MB, U + 3 * GB)
    assert r["change"] == "create" and r["zap"] is None
    assert pages(vm) == (1536, 2, 0)
    r = region(vm, 0, 0, 4 * MB, U, flags=1)  # FLAGS_ONLY: logging on, no quirk path
    assert r["change"] == "flags_only"
    assert r["zap"] is None or r["zap"]["path"] not in ("zap_all_fast", "zap_slot_leafs")
    assert r["zap"] is None or r["zap"]["sptes_zapped_total"] == 0
    assert vm.stats()["zaps_all_fast"] == 0 and vm.stats()["zaps_slot_leafs"] == 0
    assert pages(vm)[0] == 1536
    check(vm)


# =========================================================================== zap slot leafs
@pytest.mark.parametrize("vm_type, quirk", ZAP_SLOT_VMS)
@pytest.mark.parametrize("op", ["delete", "move"])
def test_zap_slot_leafs_zaps_only_the_slot(vm_type: int, quirk: bool, op: str) -> None:
    vm = layout(vm_type, quirk)
    before = vm.stats()
    root = vm.roots()[0]
    z = change(op, vm, 1)["zap"]
    assert z["path"] == "zap_slot_leafs"
    assert z["cause"] == f"memslot_{op}"
    assert (z["sptes_zapped"]["4k"], z["sptes_zapped"]["2m"], z["sptes_zapped"]["1g"]) == (
        512,
        2,
        0,
    )
    assert z["sptes_zapped_total"] == 514
    assert (z["gfn_start"], z["gfn_end"]) == (GB >> 12, (GB + 6 * MB) >> 12)
    assert z["roots_invalidated"] == 0
    # Non-leaf tables stay (now empty): nothing freed.
    assert z["tables_freed"] == 0
    after = vm.stats()
    assert after["page_tables"] == before["page_tables"] == 7
    # One flush because something was zapped in a valid root.
    assert z["tlb_flushes"] == 1
    assert after["remote_tlb_flush_requests"] == before["remote_tlb_flush_requests"] + 1
    assert after["remote_tlb_flush"] <= after["remote_tlb_flush_requests"]
    assert pages(vm) == (1024, 0, 0)
    assert after["zaps_slot_leafs"] == 1 and after["zaps_all_fast"] == 0
    # Roots stay valid; vCPUs keep theirs; the other slot stays mapped.
    roots = vm.roots()
    assert [(r["id"], r["valid"]) for r in roots] == [(root["id"], True)]
    assert {v["roots"]["direct"] for v in vm.vcpus_view()} == {root["id"]}
    r = access(vm, 0, 4 * MB, vcpu=0)
    assert (r["mapped"], r["spurious"], r["refaults"]) == (0, 1024, 0)
    assert all(v["stats"]["root_reloads"] == 0 for v in vm.vcpus_view())
    check(vm)


@pytest.mark.parametrize("vm_type, quirk", ZAP_SLOT_VMS)
def test_zap_slot_leafs_with_nothing_mapped_reports_the_path_and_does_not_flush(
    vm_type: int, quirk: bool
) -> None:
    vm = layout(vm_type, quirk)
    before = vm.stats()
    z = delete(vm, 2)["zap"]
    assert z["path"] == "zap_slot_leafs"
    assert z["sptes_zapped_total"] == 0
    assert (z["tlb_flushes"], z["tables_freed"], z["roots_invalidated"]) == (0, 0, 0)
    after = vm.stats()
    assert after["remote_tlb_flush_requests"] == before["remote_tlb_flush_requests"]
    assert pages(vm) == (1536, 2, 0)
    check(vm)


@pytest.mark.parametrize("vm_type, quirk", ZAP_SLOT_VMS)
def test_zap_slot_leafs_of_a_4k_slot_exact_counts(vm_type: int, quirk: bool) -> None:
    vm = layout(vm_type, quirk)
    z = delete(vm, 0)["zap"]
    assert z["sptes_zapped"]["4k"] == 1024 and z["sptes_zapped_total"] == 1024
    assert pages(vm) == (512, 2, 0)
    assert vm.stats()["page_tables"] == 7
    assert leaf(vm, GB) is not None and leaf(vm, GB + 5 * MB) is not None
    check(vm)


def test_zap_slot_refaults_when_the_slot_comes_back() -> None:
    vm = layout(DEFAULT, quirk=False)
    delete(vm, 1)
    region(vm, 1, GB, 6 * MB, U + GB)
    r = access(vm, GB, 6 * MB, vcpu=1)
    assert r["levels"] == {"4k": 512, "2m": 2, "1g": 0}
    assert (r["mapped"], r["refaults"]) == (1536, 1536)
    assert vm.stats()["refaults"] == 1536
    check(vm)


def test_flush_request_without_an_ipi_when_no_vcpu_is_in_the_guest() -> None:
    """§7: remote_tlb_flush_requests counts every flush; remote_tlb_flush only when a vCPU had
    to be IPI'd. Pre-faulted memory, vCPUs never ran: a request, no IPI."""
    vm = Vm.create(DEFAULT, 2)
    disable_quirk(vm)
    region(vm, 0, 0, 4 * MB, U)
    vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=4 * MB)))
    z = delete(vm, 0)["zap"]
    assert z["tlb_flushes"] == 1 and z["vcpu_kicks"] == 0
    s = vm.stats()
    assert (s["remote_tlb_flush_requests"], s["remote_tlb_flush"]) == (1, 0)


@pytest.mark.parametrize(
    "quirk, path, left",
    [(True, "zap_all_fast", (0, 0, 0)), (False, "zap_slot_leafs", (1536, 2, 0))],
)
def test_deleting_an_smm_slot(quirk: bool, path: str, left: tuple[int, int, int]) -> None:
    """A DEFAULT VM has two address spaces; zap all drops the SPTEs of both, the targeted zap
    only touches roots of the slot's own address space (as_id 1, never entered here)."""
    vm = layout(DEFAULT, quirk)
    smm = (1 << 16) | 0
    region(vm, smm, 0, 4 * MB, U + 32 * GB)
    before = vm.stats()["remote_tlb_flush_requests"]
    z = delete(vm, smm)["zap"]
    assert z["path"] == path
    assert pages(vm) == left
    assert vm.stats()["remote_tlb_flush_requests"] == before
    check(vm)


def test_empty_tables_left_by_zap_slot_are_freed_when_huge_leaves_replace_them() -> None:
    vm = layout(DEFAULT, quirk=False)
    delete(vm, 0)
    assert vm.stats()["page_tables"] == 7  # two empty L1 tables remain linked
    vm.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, U)
    r = access(vm, 0, 4 * MB)
    assert r["levels"] == {"4k": 0, "2m": 2, "1g": 0}
    assert vm.stats()["page_tables"] == 5
    check(vm)


# =========================================================================== failed MOVE
@pytest.mark.parametrize(
    "vm_type, quirk, path, left",
    [
        (DEFAULT, True, "zap_all_fast", (0, 0, 0)),
        (DEFAULT, False, "zap_slot_leafs", (1024, 0, 0)),
        (SW_PROTECTED, True, "zap_slot_leafs", (1024, 0, 0)),
    ],
)
def test_move_failing_its_late_check_has_still_zapped(
    vm_type: int, quirk: bool, path: str, left: tuple[int, int, int]
) -> None:
    """§2.1 V21: the old slot is invalidated and zapped before the max-gfn check fails."""
    vm = layout(vm_type, quirk)
    gpa = (MAX_GFN + 1 - 512) << 12  # the 6 MiB slot would end beyond the max gfn
    with pytest.raises(KvmError) as e:
        region(vm, 1, gpa, 6 * MB, U + GB)
    assert e.value.errno == errno.EINVAL
    assert getattr(e.value, "state_changed", False) is True
    z = vm.zap_events()[0]
    assert (z["cause"], z["path"]) == ("memslot_move", path)
    assert pages(vm) == left
    s = vm.memslot(1)  # the old slot is restored unchanged
    assert (s["guest_phys_addr"], s["memory_size"], s["userspace_addr"]) == (GB, 6 * MB, U + GB)
    r = access(vm, GB, 6 * MB, vcpu=1)
    assert r["exit"] is None and r["levels"] == {"4k": 512, "2m": 2, "1g": 0}
    assert r["refaults"] == 1536
    check(vm)


def test_move_rejected_before_the_zap_changes_nothing() -> None:
    """EEXIST (V18) comes before the slot is invalidated: no zap."""
    vm = layout()
    with pytest.raises(KvmError) as e:
        region(vm, 1, 0, 6 * MB, U + GB)  # overlaps slot 0
    assert e.value.errno == errno.EEXIST
    assert not getattr(e.value, "state_changed", False)
    assert vm.zap_events() == []
    assert pages(vm) == (1536, 2, 0)


# =========================================================================== data
DATA_VMS = [
    pytest.param(DEFAULT, True, id="zap-all"),
    pytest.param(DEFAULT, False, id="quirk-disabled"),
    pytest.param(SW_PROTECTED, True, id="sw-protected"),
]


@pytest.mark.parametrize("vm_type, quirk", DATA_VMS)
def test_moved_slot_shows_the_same_host_bytes_at_the_new_gpa(vm_type: int, quirk: bool) -> None:
    vm = layout(vm_type, quirk)
    store(vm, 0x1234, b"slot-zero")
    store(vm, GB + 3 * MB + 8, b"huge-one")
    store(vm, GB + 5 * MB, b"small-one", vcpu=1)
    region(vm, 1, 8 * GB, 6 * MB, U + GB)  # MOVE
    assert load(vm, 8 * GB + 3 * MB + 8, 8) == {"data": b"huge-one".hex()}
    assert load(vm, 8 * GB + 5 * MB, 9, vcpu=1) == {"data": b"small-one".hex()}
    old = load(vm, GB + 3 * MB + 8, 8)
    assert old == {
        "exit": {"reason": "KVM_EXIT_MMIO", "gpa": GB + 3 * MB + 8, "len": 8, "is_write": False}
    }
    assert load(vm, 0x1234, 9) == {"data": b"slot-zero".hex()}
    # Host writes after the move are seen at the new GPA.
    vm.apply(parse("host_write", dict(userspace_addr=U + GB + 0x10, data="abcdef")))
    assert load(vm, 8 * GB + 0x10, 3) == {"data": "abcdef"}
    check(vm)


@pytest.mark.parametrize("vm_type, quirk", DATA_VMS)
def test_deleted_gpa_exits_and_a_new_slot_there_never_shows_stale_bytes(
    vm_type: int, quirk: bool
) -> None:
    vm = layout(vm_type, quirk)
    store(vm, 0x2000, b"old-bytes")
    store(vm, GB + 0x10, b"huge-old")
    delete(vm, 0)
    delete(vm, 1)
    assert load(vm, 0x2000, 4)["exit"]["reason"] == "KVM_EXIT_MMIO"
    st = store(vm, GB + 0x10, b"x")
    assert st == {"exit": {"reason": "KVM_EXIT_MMIO", "gpa": GB + 0x10, "len": 1, "is_write": True}}
    # The host memory itself is untouched by a memslot delete.
    assert vm.host_read(U + 0x2000, 9) == {"data": b"old-bytes".hex()}
    # New slots over the old GPAs, backed by other host memory: their bytes, not the old ones.
    region(vm, 0, 0, 4 * MB, U + 16 * GB)
    region(vm, 1, GB, 6 * MB, U + 17 * GB)
    assert load(vm, 0x2000, 9) == {"data": "00" * 9}
    assert load(vm, GB + 0x10, 8) == {"data": "00" * 8}
    vm.apply(parse("host_write", dict(userspace_addr=U + 17 * GB + 0x10, data="77")))
    assert load(vm, GB + 0x10, 1) == {"data": "77"}
    check(vm)


@pytest.mark.parametrize("vm_type, quirk", DATA_VMS)
def test_move_onto_its_own_old_range_never_shows_stale_bytes(vm_type: int, quirk: bool) -> None:
    """Moving [1G, 1G+6M) up by 2 MiB: GPA 1G+2M used to map HVA U+1G+2M (a 2M leaf); after the
    move it must map U+1G. A leaf left over from the old layout would show the wrong bytes."""
    vm = layout(vm_type, quirk)
    vm.apply(parse("host_write", dict(userspace_addr=U + GB + 0x10, data=b"first-2M".hex())))
    vm.apply(
        parse("host_write", dict(userspace_addr=U + GB + 2 * MB + 0x10, data=b"second2M".hex()))
    )
    assert load(vm, GB + 2 * MB + 0x10, 8) == {"data": b"second2M".hex()}
    r = region(vm, 1, GB + 2 * MB, 6 * MB, U + GB)
    assert r["change"] == "move"
    assert load(vm, GB + 2 * MB + 0x10, 8) == {"data": b"first-2M".hex()}
    assert load(vm, GB + 4 * MB + 0x10, 8) == {"data": b"second2M".hex()}
    assert load(vm, GB + 0x10, 8)["exit"]["reason"] == "KVM_EXIT_MMIO"
    check(vm)


@pytest.mark.parametrize("vm_type, quirk", DATA_VMS)
def test_move_back_and_forth_keeps_data(vm_type: int, quirk: bool) -> None:
    vm = layout(vm_type, quirk)
    store(vm, 0x3000, b"\x01\x02\x03")
    for gpa in (32 * GB, 0, 48 * GB, 0):
        region(vm, 0, gpa, 4 * MB, U)
        assert load(vm, gpa + 0x3000, 3) == {"data": "010203"}
        store(vm, gpa + 0x4000, gpa.to_bytes(8, "little"))
        assert vm.host_read(U + 0x4000, 8) == {"data": gpa.to_bytes(8, "little").hex()}
        check(vm)


# =========================================================================== explicit zaps
def test_explicit_range_zap_counts_and_whole_huge_leaf() -> None:
    vm = layout()
    before = vm.stats()
    z = vm.apply(parse("zap", dict(scope="range", gpa=GB + MB, size=2 * MB, roots="both")))
    # [1G+1M, 1G+3M) intersects both 2M leaves: each is zapped whole; no 4K leaf there.
    assert (z["cause"], z["path"]) == ("explicit", "zap_gfn_range")
    assert (z["sptes_zapped"]["4k"], z["sptes_zapped"]["2m"]) == (0, 2)
    assert z["tlb_flushes"] == 1
    assert vm.stats()["remote_tlb_flush_requests"] == before["remote_tlb_flush_requests"] + 1
    assert pages(vm) == (1536, 0, 0)
    z = vm.apply(parse("zap", dict(scope="range", gpa=16 * GB, size=MB, roots="both")))
    assert z["sptes_zapped_total"] == 0 and z["tlb_flushes"] == 0
    check(vm)


def test_explicit_zap_all_is_the_fast_zap() -> None:
    vm = layout()
    z = vm.apply(parse("zap", dict(scope="all", roots="shared")))
    assert (z["cause"], z["path"], z["roots_invalidated"], z["tlb_flushes"]) == (
        "explicit",
        "zap_all_fast",
        1,
        0,
    )
    assert z["sptes_zapped_total"] == 1538
    assert pages(vm) == (0, 0, 0)
    check(vm)


@pytest.mark.parametrize(
    "args",
    [
        dict(scope="range", gpa=0x800, size=KB4),
        dict(scope="range", gpa=0, size=0),
        dict(scope="range", gpa=0, size=100),
        dict(scope="everything"),
        dict(scope="all", roots="private"),  # a DEFAULT VM has no private (mirror) root
    ],
)
def test_explicit_zap_rejects_bad_requests(args: dict) -> None:
    vm = layout()
    with pytest.raises(KvmError) as e:
        vm.apply(parse("zap", args))
    assert e.value.errno == errno.EINVAL
    assert pages(vm) == (1536, 2, 0)


def test_zap_events_are_listed_newest_first() -> None:
    vm = layout(DEFAULT, quirk=False)
    delete(vm, 2)
    change("move", vm, 1)
    delete(vm, 0)
    events = vm.zap_events()
    assert [e["cause"] for e in events] == ["memslot_delete", "memslot_move", "memslot_delete"]
    assert [e["seq"] for e in events] == sorted((e["seq"] for e in events), reverse=True)
    assert [e["sptes_zapped_total"] for e in events] == [1024, 514, 0]
