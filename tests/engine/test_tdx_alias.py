"""The x86 prepare hook's TDX alias check, through KVM_SET_USER_MEMORY_REGION2 on a TD: only the
slot's LAST gfn is tested for the shared bit (kvm-private-tdx.md §8.11), so a slot that ends
on the bit is EINVAL whatever its start, and one that starts on it but ends past it is not."""

from __future__ import annotations

import errno

import pytest

from app.engine import Vm

from . import mmu as kit

PAGE = kit.PAGE
SHARED_GFN = kit.S47 // PAGE  # a 4-level TD's shared bit as a gfn bit


@pytest.fixture
def td() -> Vm:
    vm = Vm.create(kit.TDX)
    assert vm.gfn_direct_bits == SHARED_GFN
    return vm


@pytest.mark.parametrize(
    "gpa, size",
    [
        (kit.S47 - PAGE, 2 * PAGE),  # starts below the bit, last gfn on it
        (kit.S47, PAGE),  # one page on the bit
        (kit.S47 - 64 * PAGE, 65 * PAGE),
    ],
)
def test_a_slot_whose_last_gfn_has_the_shared_bit_is_einval(td: Vm, gpa: int, size: int) -> None:
    assert kit.rejected(td, "set_user_memory_region", _slot(gpa, size)).errno == errno.EINVAL
    assert td.memslots() == []


def test_a_slot_ending_just_below_the_shared_bit_is_accepted(td: Vm) -> None:
    r = kit.region(td, 0, kit.S47 - 64 * PAGE, 64 * PAGE, kit.HVA)
    assert r["change"] == "create"
    assert r["memslot"]["base_gfn"] + r["memslot"]["npages"] - 1 == SHARED_GFN - 1


def test_only_the_last_gfn_counts_a_slot_starting_on_the_bit_but_ending_past_it_is_accepted(
    td: Vm,
) -> None:
    """base gfn 0xF_F000_0000 has bit 35 set; its last gfn 0x10_0FFF_FFFF does not."""
    base = 0xF_F000_0000
    npages = 1 << 29
    assert base & SHARED_GFN and not (base + npages - 1) & SHARED_GFN
    r = kit.region(td, 0, base * PAGE, npages * PAGE, kit.HVA)
    assert r["change"] == "create" and r["memslot"]["npages"] == npages


def _slot(gpa: int, size: int) -> dict:
    return dict(slot=0, flags=0, guest_phys_addr=gpa, memory_size=size, userspace_addr=kit.HVA)
