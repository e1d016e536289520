"""EPT SPTE bit layout (kvm-private-tdx.md §1.4.1, §1.5, §1.6; arch/x86/kvm/mmu/spte.h).

All helpers work on numpy uint64 arrays as well as on Python ints, so a whole page-table page
is classified or rewritten in one expression.
"""

from __future__ import annotations

import numpy as np

EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_MT_SHIFT = 3
EPT_MT_WB = 6 << EPT_MT_SHIFT
EPT_IPAT = 1 << 6
EPT_PS = 1 << 7  # large page
EPT_A = 1 << 8
EPT_D = 1 << 9
SPTE_MMU_PRESENT = 1 << 11
PFN_SHIFT = 12
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)
EPT_HOST_WRITABLE = 1 << 57
EPT_MMU_WRITABLE = 1 << 58
SUPPRESS_VE = 1 << 63

SHADOW_NONPRESENT_VALUE = SUPPRESS_VE
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
# EPT MMIO SPTE: W+X without R is an EPT misconfiguration (mask RWX|SUPPRESS_VE, value 0b110).
EPT_MMIO_MASK = EPT_R | EPT_W | EPT_X | SUPPRESS_VE
EPT_MMIO_VALUE = EPT_W | EPT_X

# Table pfns live in their own range so a non-leaf SPTE names its child table exactly.
TABLE_PFN_BASE = 1 << 36
GMEM_PFN_BASE = 1 << 38

_U = np.uint64
NONPRESENT = _U(SHADOW_NONPRESENT_VALUE)
U_PRESENT = _U(SPTE_MMU_PRESENT)
U_PS = _U(EPT_PS)
U_W = _U(EPT_W)
U_X = _U(EPT_X)
U_A = _U(EPT_A)
U_D = _U(EPT_D)
U_MMU_WRITABLE = _U(EPT_MMU_WRITABLE)
U_ADDR = _U(SPTE_BASE_ADDR_MASK)
U_SHIFT = _U(PFN_SHIFT)


def leaf_bits(
    *, level: int, writable: bool, host_writable: bool, exec_: bool, ipat: bool, accessed: bool
) -> int:
    """Everything of a leaf SPTE but its pfn, built in make_spte's order (§1.6.1)."""
    spte = SPTE_MMU_PRESENT | EPT_R | SUPPRESS_VE
    if accessed:
        spte |= EPT_A
    if exec_:
        spte |= EPT_X
    if level > 1:
        spte |= EPT_PS
    spte |= EPT_MT_WB | (EPT_IPAT if ipat else 0)
    if host_writable:
        spte |= EPT_HOST_WRITABLE
        if writable:
            # TDP faults pass ACC_ALL: writable whenever the host mapping is; D accompanies W.
            spte |= EPT_W | EPT_MMU_WRITABLE | EPT_D
    return spte


def nonleaf_spte(table_pfn: int) -> int:
    """Non-leaf entries grant everything; permissions are only restricted at leaves (§1.6.2)."""
    return (table_pfn << PFN_SHIFT) | SPTE_MMU_PRESENT | EPT_R | EPT_W | EPT_X | EPT_A | SUPPRESS_VE


def mmio_spte(gfn: int, generation: int) -> int:
    """An MMIO SPTE caching 'no memslot here', tagged with the 19-bit memslot generation."""
    gen = generation & ((1 << 19) - 1)
    low, high = gen & 0xFF, gen >> 8
    return EPT_MMIO_VALUE | (low << 3) | ((gfn << PFN_SHIFT) & SPTE_BASE_ADDR_MASK) | (high << 52)


def mmio_generation(spte: int) -> int:
    return ((spte >> 3) & 0xFF) | (((spte >> 52) & 0x7FF) << 8)


def is_mmio(spte: int) -> bool:
    return (spte & EPT_MMIO_MASK) == EPT_MMIO_VALUE


def is_leaf(spte: int, level: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT) and (level == 1 or bool(spte & EPT_PS))


def pfn_of(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PFN_SHIFT


def decode(spte: int, level: int) -> dict[str, object]:
    """A readable view of one entry for translate / mappings."""
    out: dict[str, object] = {"raw": f"0x{spte:016x}", "level": level}
    if not spte & SPTE_MMU_PRESENT:
        out["present"] = False
        out["mmio"] = is_mmio(spte)
        if out["mmio"]:
            out["mmio_generation"] = mmio_generation(spte)
        return out
    out.update(
        present=True,
        leaf=is_leaf(spte, level),
        pfn=pfn_of(spte),
        r=bool(spte & EPT_R),
        w=bool(spte & EPT_W),
        x=bool(spte & EPT_X),
        accessed=bool(spte & EPT_A),
        dirty=bool(spte & EPT_D),
        host_writable=bool(spte & EPT_HOST_WRITABLE),
        mmu_writable=bool(spte & EPT_MMU_WRITABLE),
        memtype=(spte >> EPT_MT_SHIFT) & 7,
        ipat=bool(spte & EPT_IPAT),
    )
    return out
