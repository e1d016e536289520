"""KVM_PRE_FAULT_MEMORY (kvm-private-tdx.md §2.8): progress written back in {gpa, size}, the
errno rules, and prefetch semantics (no Accessed bit, not a real fault)."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse
from tests.engine import mmu as kit

from .mmu import check, leaf, pages, region

U = 0x7F00_0000_0000
KB4, MB, GB = 1 << 12, 1 << 20, 1 << 30
RO = 2


def pre_fault(vm: Vm, gpa: int, size: int, flags: int = 0, vcpu: int = 0) -> dict:
    return vm.apply(parse("pre_fault", dict(vcpu=vcpu, gpa=gpa, size=size, flags=flags)))


@pytest.fixture
def vm() -> Vm:
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    return v


def test_pre_fault_maps_the_whole_range_and_reports_nothing_left(vm: Vm) -> None:
    assert pre_fault(vm, 0x10000, 16 * KB4) == {"gpa": 0x20000, "size": 0}
    assert pages(vm) == (16, 0, 0)
    for p in range(16, 32):
        assert leaf(vm, p * KB4) is not None
    assert leaf(vm, 15 * KB4) is None and leaf(vm, 32 * KB4) is None
    check(vm)


def test_pre_fault_leaves_no_accessed_bit(vm: Vm) -> None:
    pre_fault(vm, 0, KB4)
    e = leaf(vm, 0)
    assert e is not None and e["accessed"] is False
    # A real guest access afterwards is spurious and sets A.
    r = vm.apply(parse("access", dict(vcpu=0, gpa=0, size=KB4, access="read")))
    assert (r["mapped"], r["spurious"]) == (0, 1)
    assert leaf(vm, 0)["accessed"] is True
    check(vm)


def test_pre_fault_is_not_a_guest_page_fault(vm: Vm) -> None:
    """pf_taken counts real faults only (§2.3 step 3)."""
    pre_fault(vm, 0, 4 * MB)
    assert vm.stats()["pf_taken"] == 0
    assert pages(vm) == (1024, 0, 0)


def test_pre_fault_stops_where_the_slot_ends(vm: Vm) -> None:
    r = pre_fault(vm, 4 * MB - 2 * KB4, 4 * KB4)
    assert r == {"gpa": 4 * MB, "size": 2 * KB4}
    assert pages(vm) == (2, 0, 0)
    check(vm)


def test_pre_fault_with_no_slot_at_the_start_is_enoent(vm: Vm) -> None:
    with pytest.raises(KvmError) as e:
        pre_fault(vm, 64 * MB, KB4)
    assert e.value.errno == errno.ENOENT
    assert pages(vm) == (0, 0, 0)


def test_pre_fault_progress_lets_userspace_resume(vm: Vm) -> None:
    region(vm, 1, 8 * MB, 4 * MB, U + 8 * MB)
    r = pre_fault(vm, 2 * MB, 8 * MB)  # [2M, 4M) mapped, [4M, 8M) has no slot
    assert r == {"gpa": 4 * MB, "size": 6 * MB}
    with pytest.raises(KvmError) as e:
        pre_fault(vm, r["gpa"], r["size"])
    assert e.value.errno == errno.ENOENT
    assert pre_fault(vm, 8 * MB, 2 * MB) == {"gpa": 10 * MB, "size": 0}
    assert pages(vm) == (1024, 0, 0)


def test_pre_fault_steps_by_the_mapped_level() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    assert pre_fault(v, KB4, 3 * MB) == {"gpa": 3 * MB + KB4, "size": 0}
    assert pages(v) == (0, 2, 0)
    e = leaf(v, KB4)
    assert e["level"] == 2 and e["accessed"] is False
    check(v)


def test_pre_fault_on_a_readonly_slot_maps_read_only() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, MB, U, flags=RO)
    assert pre_fault(v, 0, 2 * KB4) == {"gpa": 2 * KB4, "size": 0}
    e = leaf(v, 0)
    assert e["w"] is False and e["host_writable"] is False
    check(v)


def test_pre_fault_of_a_mapped_range_succeeds_and_maps_nothing_new(vm: Vm) -> None:
    vm.apply(parse("access", dict(vcpu=0, gpa=0, size=MB, access="write")))
    assert pre_fault(vm, 0, MB) == {"gpa": MB, "size": 0}
    assert pages(vm) == (256, 0, 0)
    assert leaf(vm, 0)["accessed"] is True


@pytest.mark.parametrize(
    "gpa, size, flags",
    [
        (0, KB4, 1),  # flags must be 0
        (0x800, KB4, 0),  # gpa not page aligned
        (0, 0x800, 0),  # size not page aligned
        (0, 0, 0),  # size 0: gpa + size <= gpa
        ((1 << 64) - KB4, 2 * KB4, 0),  # wraps
    ],
)
def test_pre_fault_einval(vm: Vm, gpa: int, size: int, flags: int) -> None:
    with pytest.raises(KvmError) as e:
        pre_fault(vm, gpa, size, flags)
    assert e.value.errno == errno.EINVAL
    assert pages(vm) == (0, 0, 0)


def test_pre_fault_unknown_vcpu_is_enoent(vm: Vm) -> None:
    with pytest.raises(KvmError) as e:
        pre_fault(vm, 0, KB4, vcpu=3)
    assert e.value.errno == errno.ENOENT


def test_pre_fault_after_zap_all_uses_the_new_root() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    region(v, 1, GB, MB, U + GB)
    pre_fault(v, 0, 4 * MB)
    region(v, 1, 0, 0, 0)  # DELETE with the quirk: every SPTE gone
    assert pages(v) == (0, 0, 0)
    assert pre_fault(v, 0, MB) == {"gpa": MB, "size": 0}
    assert pages(v) == (256, 0, 0)
    assert [r["valid"] for r in v.roots()] == [True] * len(v.roots())
    check(v)


# -- regression cases from the engine review --------------------------------------------------
@pytest.mark.parametrize("vm_type", [kit.SW_PROTECTED, kit.TDX])
def test_prefault_of_private_gfn_without_memslot_is_efault(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    kit.attrs(vm, 0, kit.PAGE, True)
    with pytest.raises(KvmError) as info:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=kit.PAGE)))
    assert info.value.errno == errno.EFAULT
    exit_ = kit.access(vm, 0)["exit"]
    assert exit_ == {
        "reason": "KVM_EXIT_MEMORY_FAULT",
        "gpa": 0,
        "size": kit.PAGE,
        "flags": kit.PRIVATE,
    }


@pytest.mark.parametrize("vm_type", [kit.DEFAULT, kit.SW_PROTECTED, kit.TDX])
def test_prefault_of_shared_hole_is_enoent(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    if vm_type != kit.DEFAULT:
        kit.attrs(vm, 0, kit.PAGE, True)
    with pytest.raises(KvmError) as info:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0x10000, size=kit.PAGE)))
    assert info.value.errno == errno.ENOENT


def test_prefault_of_1gib_maps_every_page() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.GB, kit.GB)
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=kit.GB))) == {
        "gpa": kit.GB,
        "size": 0,
    }
    s = vm.stats()
    # 4K host pages: 262144 leaves in 512 level-1 tables under one PD, PDPT and PML4.
    assert (s["pages_4k"], s["pages_2m"], s["page_tables"]) == (kit.GB // kit.PAGE, 0, 515)


def test_tdx_accept_of_256mib_maps_and_accepts_every_page() -> None:
    size = kit.GB // 4
    td, _ = kit.td_with_gmem(size)
    r = td.apply(parse("accept", dict(vcpu=0, gpa=0, size=size)))
    n = size // kit.PAGE
    assert r == {"accepted": n, "reaccepted": 0, "exit": None}
    s = td.stats()
    assert (s["pages_4k"], s["private_pages_4k"], s["tdx_accepted_pages"]) == (n, n, n)
    assert (s["tdx_tdh_mem_page_aug"], s["tdx_tdg_mem_page_accept"]) == (n, n)
    assert td.audit()["ok"] is True


def test_prefault_never_replaces_a_present_table() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0)  # one 4K leaf -> a level-1 table
    kit.hugepage(vm, kit.HVA, kit.M2)
    tables = vm.stats()["page_tables"]
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=kit.PAGE, size=kit.PAGE))) == {
        "gpa": 2 * kit.PAGE,
        "size": 0,
    }
    s = vm.stats()
    assert (s["pages_4k"], s["pages_2m"], s["page_tables"]) == (1, 0, tables)
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 1


@pytest.mark.parametrize("kind", ["read", "write"])
def test_prefault_leaves_accessed_dirty_of_present_leaves_untouched(kind: str) -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0, kit.PAGE, kind)
    before = vm.translate(0)["roots"][0]["walk"][-1]
    assert before["accessed"] is True
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=2 * kit.PAGE))) == {
        "gpa": 2 * kit.PAGE,
        "size": 0,
    }
    after = vm.translate(0)["roots"][0]["walk"][-1]
    assert after["raw"] == before["raw"]
    # The newly prefetched neighbour has no Accessed bit.
    assert vm.translate(kit.PAGE)["roots"][0]["walk"][-1]["accessed"] is False
