"""KVM_CLEAR_DIRTY_LOG's argument checks in the kernel's order, INITIALLY_SET's split spans,
and the bitmap of a slot longer than 64 words (kvm_clear_dirty_log_protect,
kvm_arch_mmu_enable_log_dirty_pt_masked, kvm_get_dirty_log_protect)."""

from __future__ import annotations

import base64
import errno

import numpy as np
import pytest

from app.engine import Vm
from app.engine.dirty import _word_spans
from app.engine.ops import parse

from . import mmu as kit

MB = 1 << 20
WORD = base64.b64encode(b"\xff" * 8).decode()  # 64 set bits


def logging_vm(npages: int = 128, manual: int = 1) -> Vm:
    vm = Vm.create(kit.DEFAULT, 1)  # two address spaces (SMM)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[manual])))
    kit.region(vm, 0, 0, npages * kit.PAGE, kit.HVA, kit.LOG_DIRTY)
    kit.access(vm, 0, npages * kit.PAGE, "write")
    return vm


def clear(vm: Vm, **kw: object) -> dict:
    args = dict(slot=0, first_page=0, num_pages=64, bitmap=WORD) | kw
    return vm.apply(parse("clear_dirty_log", args))


@pytest.mark.parametrize(
    "slot",
    [
        32764,  # id == KVM_USER_MEM_SLOTS
        (1 << 16) | 32764,  # the same id in the SMM address space
        0xFFFF,
        2 << 16,  # as_id == the VM's number of address spaces
        0xFFFFFFFF,  # the largest u32
    ],
)
def test_slot_out_of_range_is_einval_before_the_lookup(slot: int) -> None:
    """`as_id >= kvm_arch_nr_memslot_as_ids || id >= KVM_USER_MEM_SLOTS` is EINVAL; only a
    slot id in range reaches the lookup (ENOENT for a missing slot)."""
    vm = logging_vm()
    assert (
        kit.rejected(
            vm, "clear_dirty_log", dict(slot=slot, first_page=0, num_pages=64, bitmap=WORD)
        ).errno
        == errno.EINVAL
    )
    assert (
        kit.rejected(
            vm, "clear_dirty_log", dict(slot=32763, first_page=0, num_pages=64, bitmap=WORD)
        ).errno
        == errno.ENOENT
    )
    assert (
        kit.rejected(
            vm, "clear_dirty_log", dict(slot=(1 << 16) | 0, first_page=0, num_pages=64, bitmap=WORD)
        ).errno
        == errno.ENOENT
    )


@pytest.mark.parametrize("slot", ["0", 1 << 32, True])
def test_slot_that_is_no_u32_is_not_found(slot: object) -> None:
    vm = logging_vm()
    err = kit.rejected(
        vm, "clear_dirty_log", dict(slot=slot, first_page=0, num_pages=64, bitmap=WORD)
    )
    assert err.errno in (errno.EINVAL, errno.ENOENT)
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["dirty_count"] == 128


@pytest.mark.parametrize("field", ["first_page", "num_pages"])
@pytest.mark.parametrize("value", ["64", True, -64, 1 << 64, 1.0])
def test_first_page_and_num_pages_must_be_u64(field: str, value: object) -> None:
    vm = logging_vm()
    err = kit.rejected(
        vm,
        "clear_dirty_log",
        {"slot": 0, "first_page": 0, "num_pages": 64, "bitmap": WORD, field: value},
    )
    assert err.errno == errno.EINVAL
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["dirty_count"] == 128


def test_the_largest_u64_num_pages_reaches_the_slot_lookup() -> None:
    """num_pages 2**64-1 is a valid __u64: a missing slot is ENOENT (the lookup comes before
    the num_pages checks); the logging slot refuses it as not ending there (EINVAL)."""
    vm = logging_vm()
    args = dict(slot=32763, first_page=0, num_pages=(1 << 64) - 1, bitmap=WORD)
    assert kit.rejected(vm, "clear_dirty_log", args).errno == errno.ENOENT
    assert kit.rejected(vm, "clear_dirty_log", args | dict(slot=0)).errno == errno.EINVAL


@pytest.mark.parametrize("bitmap", ["//8=!", "AAAA AAAA AAA=", "%%%%%%%%%%%%"])
def test_bitmap_must_be_strict_base64(bitmap: str) -> None:
    vm = logging_vm()
    err = kit.rejected(
        vm, "clear_dirty_log", dict(slot=0, first_page=0, num_pages=64, bitmap=bitmap)
    )
    assert err.errno == errno.EINVAL
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["dirty_count"] == 128


def test_bitmap_shorter_than_num_pages_at_the_slot_end() -> None:
    """A 72-page slot: num_pages 72 ends the slot (no multiple of 64 needed) but 8 bytes hold
    only 64 bits."""
    vm = logging_vm(72)
    assert (
        kit.rejected(
            vm, "clear_dirty_log", dict(slot=0, first_page=0, num_pages=72, bitmap=WORD)
        ).errno
        == errno.EINVAL
    )
    nine = base64.b64encode(b"\xff" * 9).decode()
    assert clear(vm, num_pages=72, bitmap=nine)["cleared"] == 72


def bits(*ranges: tuple[int, int], n: int = 256) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for a, b in ranges:
        m[a:b] = True
    return m


@pytest.mark.parametrize(
    "mask, spans",
    [
        (bits((3, 4)), [(3, 4)]),
        (bits((5, 6), (60, 61)), [(5, 61)]),  # one word: first to last set bit
        (bits((70, 71), (100, 101)), [(70, 101)]),  # the second word
        (bits((10, 11), (200, 202)), [(10, 11), (200, 202)]),  # two words apart
        (bits((60, 64), (64, 66)), [(60, 66)]),  # touching across a word edge: merged
        (bits((0, 64), (64, 128)), [(0, 128)]),
        (bits((63, 64), (130, 131)), [(63, 64), (130, 131)]),
        (bits((1, 2), (62, 63), (129, 130), (191, 192)), [(1, 63), (129, 192)]),
        (bits((250, 251), n=251), [(250, 251)]),  # a last, partial word
        (bits((4170, 4171), n=4171), [(4170, 4171)]),  # 66 words
        (bits(), []),
    ],
)
def test_word_spans(mask: np.ndarray, spans: list[tuple[int, int]]) -> None:
    """INITIALLY_SET: each 64-bit word of the mask splits from its first to its last set bit
    (kvm_arch_mmu_enable_log_dirty_pt_masked: __ffs(mask) .. __fls(mask))."""
    assert _word_spans(mask) == spans


def test_initially_set_splits_only_the_cleared_huge_page() -> None:
    """A slot at 4 MiB with two 2 MiB leaves: INITIALLY_SET leaves them whole when logging
    starts; clearing bits of the second splits that one only."""
    vm = Vm.create(kit.DEFAULT, 1)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[3])))
    kit.hugepage(vm, kit.HVA, 4 * MB)
    kit.region(vm, 0, 4 * MB, 4 * MB, kit.HVA)
    kit.access(vm, 4 * MB, 4 * MB)
    assert kit.pages(vm)[:2] == (0, 2)
    kit.region(vm, 0, 4 * MB, 4 * MB, kit.HVA, kit.LOG_DIRTY)
    assert kit.pages(vm)[:2] == (0, 2)
    second = base64.b64encode(b"\x00" * 64 + b"\x01" + b"\x00" * 63).decode()  # page 512
    assert clear(vm, num_pages=1024, bitmap=second)["cleared"] == 1  # all set initially
    assert kit.pages(vm)[:2] == (512, 1)
    assert kit.leaf(vm, 4 * MB)["level"] == 2
    assert kit.leaf(vm, 6 * MB)["level"] == 1


def test_bitmap_of_a_slot_longer_than_64_words() -> None:
    """4160 pages = 65 words: the bitmap is 65 u64s, the last page's bit in the last one."""
    vm = Vm.create(kit.DEFAULT, 1)
    kit.region(vm, 0, 0, 4160 * kit.PAGE, kit.HVA, kit.LOG_DIRTY)
    kit.access(vm, 4159 * kit.PAGE, kit.PAGE, "write")
    log = vm.apply(parse("get_dirty_log", dict(slot=0)))
    raw = base64.b64decode(log["bitmap"])
    assert len(raw) == 65 * 8
    assert raw[-8:] == (1 << 63).to_bytes(8, "little") and not any(raw[:-8])
    assert log["dirty_count"] == 1
