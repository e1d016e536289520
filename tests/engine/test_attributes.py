"""KVM_SET_MEMORY_ATTRIBUTES argument rules (kvm-private-tdx.md §3.2) and the range store."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from app.engine import uapi
from app.engine.attributes import PRIVATE, MemoryAttributes, supported_attributes
from app.engine.ops import parse
from app.engine.vm import Vm
from tests.engine import expect, fingerprint
from tests.engine import mmu as kit
from tests.engine.mmu import apply_json

DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROT = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
PAGE = 4096


@pytest.fixture
def attrs() -> MemoryAttributes:
    return MemoryAttributes()


def test_supported_attributes() -> None:
    assert supported_attributes(None) == PRIVATE == 8
    assert supported_attributes(DEFAULT) == 0
    assert supported_attributes(SW_PROT) == PRIVATE
    assert supported_attributes(TDX) == PRIVATE


@pytest.mark.parametrize("vm_type", [SW_PROT, TDX])
def test_flags_must_be_zero(attrs: MemoryAttributes, vm_type: int) -> None:
    err = expect(errno.EINVAL, attrs.check, 0, PAGE, PRIVATE, 1, vm_type=vm_type)
    assert "flags" in err.detail


def test_private_refused_without_private_memory(attrs: MemoryAttributes) -> None:
    expect(errno.EINVAL, attrs.check, 0, PAGE, PRIVATE, 0, vm_type=DEFAULT)


def test_attributes_zero_accepted_on_default_vm(attrs: MemoryAttributes) -> None:
    assert attrs.check(0, PAGE, 0, 0, vm_type=DEFAULT) == (0, 1)


@pytest.mark.parametrize("attributes", [1, 1 << 4, PRIVATE | 1, 1 << 63])
def test_unknown_attribute_bits_are_einval(attrs: MemoryAttributes, attributes: int) -> None:
    expect(errno.EINVAL, attrs.check, 0, PAGE, attributes, 0, vm_type=TDX)


def test_size_zero_is_einval(attrs: MemoryAttributes) -> None:
    expect(errno.EINVAL, attrs.check, 0, 0, PRIVATE, 0, vm_type=TDX)


def test_wrap_around_is_einval(attrs: MemoryAttributes) -> None:
    expect(errno.EINVAL, attrs.check, (1 << 64) - PAGE, 2 * PAGE, PRIVATE, 0, vm_type=TDX)
    expect(errno.EINVAL, attrs.check, (1 << 64) - PAGE, PAGE, PRIVATE, 0, vm_type=TDX)


@pytest.mark.parametrize("address,size", [(1, PAGE), (0, PAGE + 1), (PAGE // 2, PAGE // 2)])
def test_unaligned_is_einval(attrs: MemoryAttributes, address: int, size: int) -> None:
    expect(errno.EINVAL, attrs.check, address, size, PRIVATE, 0, vm_type=TDX)


@pytest.mark.parametrize(
    "args",
    [
        (-PAGE, PAGE, 8, 0),
        (0, 1 << 64, 8, 0),
        (0, PAGE, -8, 0),
        (0, PAGE, 8, -1),
        ("0", PAGE, 8, 0),
        (0, PAGE, 8, None),
        (0, PAGE, True, 0),
    ],
)
def test_values_that_do_not_fit_are_einval(attrs: MemoryAttributes, args: tuple) -> None:
    expect(errno.EINVAL, attrs.check, *args, vm_type=TDX)


def test_flags_checked_before_attributes(attrs: MemoryAttributes) -> None:
    err = expect(errno.EINVAL, attrs.check, 0, 0, 1, 2, vm_type=DEFAULT)
    assert "flags" in err.detail


def test_range_need_not_be_covered_by_memslots(attrs: MemoryAttributes) -> None:
    assert attrs.check(1 << 50, 1 << 40, PRIVATE, 0, vm_type=TDX) == (
        1 << 38,
        (1 << 38) + (1 << 28),
    )


# -- the store ---------------------------------------------------------------------------------
def test_set_reports_changed_ranges(attrs: MemoryAttributes) -> None:
    assert attrs.set(10, 20, PRIVATE) == [(10, 20, 0, PRIVATE)]
    assert attrs.set(10, 20, PRIVATE) == []  # already so: the kernel returns at once
    assert attrs.set(5, 25, PRIVATE) == [(5, 10, 0, PRIVATE), (20, 25, 0, PRIVATE)]
    assert attrs.ranges() == [{"address": 5 * PAGE, "size": 20 * PAGE, "attributes": PRIVATE}]
    assert attrs.set(0, 12, 0) == [(5, 12, PRIVATE, 0)]
    assert attrs.set(15, 17, 0) == [(15, 17, PRIVATE, 0)]
    assert [(r["address"] // PAGE, r["size"] // PAGE) for r in attrs.ranges()] == [(12, 3), (17, 8)]
    assert attrs.set(0, 100, 0) == [(12, 15, PRIVATE, 0), (17, 25, PRIVATE, 0)]
    assert attrs.ranges() == []


def test_adjacent_private_ranges_merge(attrs: MemoryAttributes) -> None:
    attrs.set(0, 10, PRIVATE)
    attrs.set(10, 20, PRIVATE)
    assert len(attrs.ranges()) == 1
    assert attrs.is_uniform(0, 20)


def test_get_mask_and_uniformity(attrs: MemoryAttributes) -> None:
    attrs.set(512, 1024, PRIVATE)
    attrs.set(2000, 2001, PRIVATE)
    assert attrs.get(511) == 0 and attrs.get(512) == PRIVATE and attrs.get(1023) == PRIVATE
    assert attrs.get(1024) == 0
    mask = attrs.private_mask(500, 2010)
    assert mask.dtype == bool and mask.shape == (1510,)
    expected = np.zeros(1510, dtype=bool)
    expected[12:524] = True
    expected[1500] = True
    assert np.array_equal(mask, expected)
    assert attrs.is_uniform(512, 1024) and attrs.is_uniform(0, 512) and attrs.is_uniform(600, 700)
    assert attrs.is_uniform(1024, 2000)
    assert not attrs.is_uniform(0, 1024) and not attrs.is_uniform(1000, 1100)
    assert not attrs.is_uniform(1024, 2001)
    assert attrs.is_uniform(5, 5)


def test_pieces_cut_a_range_by_attributes(attrs: MemoryAttributes) -> None:
    attrs.set(10, 20, PRIVATE)
    assert attrs.pieces(0, 30) == [(0, 10, 0), (10, 20, PRIVATE), (20, 30, 0)]
    assert attrs.pieces(12, 15) == [(12, 15, PRIVATE)]


def test_huge_ranges_are_stored_as_ranges(attrs: MemoryAttributes) -> None:
    attrs.set(0, 1 << 40, PRIVATE)
    attrs.set(1 << 20, (1 << 20) + 1, 0)
    assert len(attrs.ranges()) == 2
    assert int(attrs.private_mask((1 << 20) - 2, (1 << 20) + 2).sum()) == 3


# -- through Vm.apply ----------------------------------------------------------------------------
def test_apply_set_memory_attributes_on_a_td() -> None:
    vm = Vm.create(TDX)
    args = {"address": 2 << 20, "size": 4 << 20, "attributes": PRIVATE, "flags": 0}
    assert vm.apply(parse("set_memory_attributes", args))["changed"] is True
    assert vm.memory_attributes() == [{"address": 2 << 20, "size": 4 << 20, "attributes": PRIVATE}]
    assert vm.apply(parse("set_memory_attributes", args))["changed"] is False  # already so: a no-op
    vm.apply(parse("set_memory_attributes", {**args, "attributes": 0}))
    assert vm.memory_attributes() == []


@pytest.mark.parametrize(
    "vm_type,args",
    [
        (DEFAULT, {"address": 0, "size": PAGE, "attributes": PRIVATE}),
        (TDX, {"address": 0, "size": PAGE, "attributes": PRIVATE, "flags": 1}),
        (TDX, {"address": 0, "size": 0, "attributes": PRIVATE}),
        (TDX, {"address": 0, "size": PAGE, "attributes": 1}),
        (SW_PROT, {"address": 100, "size": PAGE, "attributes": PRIVATE}),
        (SW_PROT, {"address": (1 << 64) - PAGE, "size": 2 * PAGE, "attributes": PRIVATE}),
        (SW_PROT, {"address": -PAGE, "size": PAGE, "attributes": PRIVATE}),
        (SW_PROT, {"address": 0, "size": PAGE, "attributes": "0x8"}),
    ],
)
def test_apply_rejected_attributes_change_nothing(vm_type: int, args: dict) -> None:
    vm = Vm.create(vm_type)
    if vm_type != DEFAULT:
        vm.apply(
            parse("set_memory_attributes", {"address": 0, "size": 1 << 20, "attributes": PRIVATE})
        )
    before = fingerprint(vm)
    expect(errno.EINVAL, apply_json, vm, "set_memory_attributes", args)
    assert fingerprint(vm) == before


# -- regression cases from the engine review --------------------------------------------------
def test_attributes_zap_exactly_the_changed_range_of_4k_leaves() -> None:
    vm = Vm.create(kit.SW_PROTECTED)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0, kit.M2)  # 512 shared 4K leaves (4K host pages)
    out = kit.attrs(vm, 0x1000, 0x1000, True)
    assert out["changed"] is True
    zap = out["zap"]
    assert (zap["cause"], zap["gfn_start"], zap["gfn_end"]) == ("attributes", 1, 2)
    assert zap["sptes_zapped_total"] == 1
    assert zap["sptes_zapped"]["4k"] == 1
    assert vm.stats()["pages_4k"] == 511
    assert vm.zap_events()[-1]["gfn_start"] == 1 and vm.zap_events()[-1]["gfn_end"] == 2


def test_attributes_zap_of_several_pages_counts_only_those() -> None:
    vm = Vm.create(kit.SW_PROTECTED)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0, kit.M2)
    zap = kit.attrs(vm, 0x3000, 0x5000, True)["zap"]
    assert (zap["gfn_start"], zap["gfn_end"], zap["sptes_zapped_total"]) == (3, 8, 5)
    assert vm.stats()["pages_4k"] == 507


def test_attributes_zap_takes_a_whole_2m_leaf_that_intersects_the_range() -> None:
    vm = Vm.create(kit.SW_PROTECTED)
    kit.hugepage(vm, kit.HVA, kit.M2)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0)
    assert vm.stats()["pages_2m"] == 1
    zap = kit.attrs(vm, 0x1000, 0x1000, True)["zap"]
    assert (zap["gfn_start"], zap["gfn_end"]) == (1, 2)
    assert zap["sptes_zapped"]["2m"] == 1 and zap["sptes_zapped_total"] == 1
    s = vm.stats()
    assert (s["pages_2m"], s["pages_4k"]) == (0, 0)
