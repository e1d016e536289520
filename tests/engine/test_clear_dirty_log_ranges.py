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
