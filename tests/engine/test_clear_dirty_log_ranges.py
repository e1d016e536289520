"""KVM_CLEAR_DIRTY_LOG's range rules, as kvm_clear_dirty_log_protect checks them after the
alignment and slot checks: first_page <= npages, num_pages <= npages - first_page, and
num_pages a multiple of 64 unless the range ends the slot (kvm-memslots.md §5.3). Ranges that
pass the multiple-of-64 check but run past the slot are the ones only the range check stops."""

from __future__ import annotations

import base64
import errno

import pytest

from app.engine import Vm
from app.engine.ops import parse

from . import mmu as kit

NPAGES = 1024  # slot 0 = [0, 4M)


def logging_vm() -> Vm:
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[1])))
    kit.region(vm, 0, 0, NPAGES * kit.PAGE, kit.HVA, kit.LOG_DIRTY)
    kit.access(vm, 0, NPAGES * kit.PAGE, "write")  # every page dirty
    return vm


def ones(npages: int) -> str:
    return base64.b64encode(b"\xff" * (-(-npages // 64) * 8)).decode()


def args(first: int, num: int) -> dict:
    # A rejected range is refused before its bitmap is read: no need for 2**63 bits of it.
    return dict(slot=0, first_page=first, num_pages=num, bitmap=ones(min(max(num, 64), 4096)))


@pytest.mark.parametrize(
    "first, num",
    [
        (0, NPAGES + 64),  # a multiple of 64, one word past the end
        (64, NPAGES),  # a multiple of 64, ends one word past the slot
        (NPAGES - 64, 128),
        (NPAGES, 64),  # starts at the end
        (NPAGES + 64, 0),  # starts past the end
        (0, 1 << 63),  # would wrap a signed subtraction
    ],
)
def test_a_range_past_the_slot_is_einval_and_changes_nothing(first: int, num: int) -> None:
    vm = logging_vm()
    err = kit.rejected(vm, "clear_dirty_log", args(first, num))
    assert err.errno == errno.EINVAL
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["dirty_count"] == NPAGES


@pytest.mark.parametrize(
    "first, num, cleared",
    [
        (0, NPAGES, NPAGES),  # the whole slot
        (NPAGES - 64, 64, 64),  # the last word exactly
        (NPAGES, 0, 0),  # empty, at the end: allowed
        (64, NPAGES - 64, NPAGES - 64),  # up to the end
    ],
)
def test_a_range_inside_the_slot_clears_exactly_its_pages(
    first: int, num: int, cleared: int
) -> None:
    vm = logging_vm()
    out = vm.apply(parse("clear_dirty_log", args(first, num)))
    assert out["cleared"] == cleared
    log = vm.apply(parse("get_dirty_log", dict(slot=0)))
    assert log["dirty_count"] == NPAGES - cleared
    kit.check(vm)


# -- the argument checks before the range: each must be EINVAL, never ENOENT or a crash --------
@pytest.mark.parametrize(
    "vm_type, slot",
    [
        (kit.DEFAULT, 2 << 16),  # address space 2 of two
        (kit.DEFAULT, 32764),  # KVM_USER_MEM_SLOTS: the first id out of range
        (kit.DEFAULT, 0xFFFF),
        (kit.DEFAULT, 0xFFFF_FFFF),
        (kit.TDX, 1 << 16),  # a TD has one address space
    ],
)
def test_a_slot_id_out_of_range_is_einval_before_any_lookup(vm_type: int, slot: int) -> None:
    vm = Vm.create(vm_type, 1)
    bm = ones(64)
    err = kit.rejected(
        vm, "clear_dirty_log", dict(slot=slot, first_page=0, num_pages=64, bitmap=bm)
    )
    assert err.errno == errno.EINVAL


@pytest.mark.parametrize(
    "bitmap",
    [
        "!!!!" + ones(64),  # not base64: never silently skipped
        base64.b64encode(b"\xff" * 15).decode(),  # 120 bits for 128 pages
    ],
)
def test_a_bad_or_short_bitmap_is_einval(bitmap: str) -> None:
    vm = logging_vm()
    err = kit.rejected(
        vm, "clear_dirty_log", dict(slot=0, first_page=0, num_pages=128, bitmap=bitmap)
    )
    assert err.errno == errno.EINVAL


@pytest.mark.parametrize("field", ["first_page", "num_pages"])
@pytest.mark.parametrize("value", ["64", 64.0, None, -64, 1 << 64])
def test_a_first_page_or_num_pages_that_is_not_a_u64_is_einval(field: str, value: object) -> None:
    vm = logging_vm()
    args = dict(slot=0, first_page=0, num_pages=64, bitmap=ones(64))
    args[field] = value
    assert kit.rejected(vm, "clear_dirty_log", args).errno == errno.EINVAL
