"""SPTE builders and decoders (app/engine/spte.py), kvm-private-tdx.md §1.6."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import spte as S


def bits(**kw: object) -> int:
    args = dict(level=1, writable=True, host_writable=True, exec_=True, ipat=True, accessed=True)
    args.update(kw)
    return S.leaf_bits(**args)  # type: ignore[arg-type]


def test_a_writable_leaf_has_w_d_and_mmu_writable() -> None:
    e = bits()
    assert e & S.EPT_W and e & S.EPT_D and e & S.EPT_MMU_WRITABLE and e & S.EPT_HOST_WRITABLE


def test_no_w_without_a_writable_host_mapping() -> None:
    e = bits(host_writable=False)
    assert not e & (S.EPT_W | S.EPT_MMU_WRITABLE | S.EPT_HOST_WRITABLE | S.EPT_D)


def test_huge_leaves_carry_ps_and_4k_leaves_do_not() -> None:
    assert bits(level=2) & S.EPT_PS and not bits(level=1) & S.EPT_PS
    assert S.is_leaf(bits(level=2), 2) and S.is_leaf(bits(level=1), 1)


def test_accessed_exec_and_ipat_bits_follow_the_arguments() -> None:
    e = bits(accessed=False, exec_=False, ipat=False)
    assert not e & (S.EPT_A | S.EPT_X | S.EPT_IPAT)
    assert e & S.SPTE_MMU_PRESENT and e & S.EPT_R


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(st.integers(0, (1 << 40) - 1))
def test_pfn_round_trips_through_a_leaf_and_a_non_leaf(pfn: int) -> None:
    assert S.pfn_of(bits() | (pfn << S.PFN_SHIFT)) == pfn
    table = S.nonleaf_spte(pfn)
    assert S.pfn_of(table) == pfn and not S.is_leaf(table, 2) and not S.is_mmio(table)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(st.integers(0, (1 << 35) - 1), st.integers(0, (1 << 19) - 1))
def test_mmio_sptes_keep_their_generation(gfn: int, gen: int) -> None:
    e = S.mmio_spte(gfn, gen)
    assert S.is_mmio(e) and not e & S.SPTE_MMU_PRESENT
    assert S.mmio_generation(e) == gen
    assert S.mmio_generation(S.mmio_spte(gfn, gen + (1 << 19))) == gen  # 19 bits only
