"""Address conversions (app/engine/addr.py), the TDX shared bit included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import addr
from app.engine.uapi import PAGE_SIZE


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(st.integers(0, (1 << 52) - 1))
def test_gpa_and_gfn_round_trip_on_page_boundaries(gfn: int) -> None:
    assert addr.gpa_to_gfn(addr.gfn_to_gpa(gfn)) == gfn
    assert addr.gpa_to_gfn(addr.gfn_to_gpa(gfn) + PAGE_SIZE - 1) == gfn


def test_hva_and_host_page_numbers() -> None:
    assert addr.hva_to_hpn(0x7F00_0000_1FFF) == 0x7F00_0000_1
    assert addr.hpn_to_hva(0x7F00_0000_1) == 0x7F00_0000_1000
    assert addr.pfn_to_hpa(0x1234) == 0x1234000


def test_page_helpers() -> None:
    assert [addr.pages(n) for n in (0, 1, PAGE_SIZE, PAGE_SIZE + 1)] == [0, 1, 1, 2]
    assert addr.page_offset(0x1234) == 0x234
    assert addr.page_aligned(0x2000) and not addr.page_aligned(0x2001)


def test_the_td_shared_bit_is_gpa_bit_47_or_51() -> None:
    # kvm-private-tdx.md §1.3: GPA bit 47 with 4-level EPT, 51 with 5-level.
    assert addr.gfn_to_gpa(addr.shared_gfn_bit(4)) == 1 << 47
    assert addr.gfn_to_gpa(addr.shared_gfn_bit(5)) == 1 << 51


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(st.integers(0, (1 << 35) - 1), st.sampled_from([4, 5]))
def test_shared_alias_and_strip_are_inverse(gfn: int, levels: int) -> None:
    bits = addr.shared_gfn_bit(levels)
    shared = addr.shared_alias(gfn, bits)
    assert addr.is_shared(shared, bits) and not addr.is_shared(gfn, bits)
    assert addr.strip_shared(shared, bits) == gfn
    assert addr.strip_shared(gfn, bits) == gfn
