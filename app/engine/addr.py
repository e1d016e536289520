"""Address kinds and every conversion between them.

- `Gpa`: guest physical address (bytes); `Gfn`: guest frame number (`Gpa >> 12`).
- `Hva`: host virtual address in the VMM (a memslot's `userspace_addr` side); `Hpn`: host page
  number (`Hva >> 12`), what host memory is indexed by.
- `Pfn`: host physical frame an SPTE points at.

On a TD the GPA's shared bit (bit 47 with 4-level EPT, bit 51 with 5-level) selects the shared
(direct) view; as a GFN bit it is `gfn_direct_bits` (kvm-private-tdx.md §1.3). Private GFNs
have it clear.
"""

from __future__ import annotations

from typing import NewType

from .uapi import PAGE_SHIFT, PAGE_SIZE

Gpa = NewType("Gpa", int)
Gfn = NewType("Gfn", int)
Hva = NewType("Hva", int)
Hpn = NewType("Hpn", int)
Pfn = NewType("Pfn", int)

PAGE_MASK = PAGE_SIZE - 1


def gpa_to_gfn(gpa: int) -> Gfn:
    return Gfn(gpa >> PAGE_SHIFT)


def gfn_to_gpa(gfn: int) -> Gpa:
    return Gpa(gfn << PAGE_SHIFT)


def hva_to_hpn(hva: int) -> Hpn:
    return Hpn(hva >> PAGE_SHIFT)


def hpn_to_hva(hpn: int) -> Hva:
    return Hva(hpn << PAGE_SHIFT)


def hva_to_pfn(hva: int) -> Pfn:
    """The frame behind a host address: host pages have pfn `hva >> 12` (docs/engine.md)."""
    return Pfn(hva >> PAGE_SHIFT)


def pfn_to_hpa(pfn: int) -> int:
    return pfn << PAGE_SHIFT


def end_page(addr: int, size: int) -> int:
    """One past the last page (GFN, host page) that [addr, addr + size) touches."""
    return (addr + size + PAGE_MASK) >> PAGE_SHIFT


def size_to_pages(size: int) -> int:
    """Pages in `size` bytes, a whole number of pages (memslot and file sizes)."""
    return size >> PAGE_SHIFT


def pages_to_size(npages: int) -> int:
    return npages << PAGE_SHIFT


def offset_to_page(offset: int) -> int:
    """Index of the page holding byte `offset` of a file (guest_memfd)."""
    return offset >> PAGE_SHIFT


def page_to_offset(index: int) -> int:
    """Byte offset of page `index` of a file (guest_memfd)."""
    return index << PAGE_SHIFT


def pages(size: int) -> int:
    """Whole pages in `size` bytes (rounded up)."""
    return (size + PAGE_MASK) >> PAGE_SHIFT


def page_offset(addr: int) -> int:
    return addr & PAGE_MASK


def page_aligned(addr: int) -> bool:
    return not addr & PAGE_MASK


def shared_gfn_bit(paging_levels: int) -> int:
    """A TD's shared bit as a GFN bit: GPA bit 47 (4-level EPT) or 51 (5-level)."""
    return 1 << ((47 if paging_levels == 4 else 51) - PAGE_SHIFT)


def is_shared(gfn: int, direct_bits: int) -> bool:
    return bool(gfn & direct_bits)


def strip_shared(gfn: int, direct_bits: int) -> Gfn:
    """The GFN without the shared bit: the memslot / attribute index of either alias."""
    return Gfn(gfn & ~direct_bits)


def strip_shared_gpa(gpa: int, direct_bits: int) -> Gpa:
    """The GPA without the shared bit (`direct_bits` given as GFN bits)."""
    return Gpa(gpa & ~gfn_to_gpa(direct_bits))


def shared_alias(gfn: int, direct_bits: int) -> Gfn:
    """The GFN as the direct (shared) root indexes it."""
    return Gfn(gfn | direct_bits)
