"""KVM_SET_MEMORY_ATTRIBUTES: per-VM attributes by GFN, kept as ranges, never per page.

x86 has one attribute, PRIVATE, so the store is the set of private GFN ranges; every other GFN
has attributes 0 (shared). Attributes exist for GFNs with or without a memslot.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Any

import numpy as np

from . import uapi
from .addr import gfn_to_gpa, gpa_to_gfn, pages_to_size
from .errors import check_u64, einval
from .intervals import IntervalSet
from .op import Op, operation
from .roots import RootRole
from .zap import zap_gfn_range

if TYPE_CHECKING:
    from .state import KvmState

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
_PAGE_MASK = uapi.PAGE_SIZE - 1


def supported_attributes(vm_type: int | None) -> int:
    """KVM_CAP_MEMORY_ATTRIBUTES: PRIVATE on /dev/kvm (None) and on VMs with private memory."""
    if vm_type is None or uapi.vm_has_private_mem(vm_type):
        return PRIVATE
    return 0


class MemoryAttributes:
    def __init__(self) -> None:
        self.private = IntervalSet()  # GFN ranges with KVM_MEMORY_ATTRIBUTE_PRIVATE

    def check(
        self, address: object, size: object, attributes: object, flags: object, *, vm_type: int
    ) -> tuple[int, int]:
        """The ioctl's argument rules in kernel order; returns the GFN range [start, end)."""
        address = check_u64(address, "address")
        size = check_u64(size, "size")
        attributes = check_u64(attributes, "attributes")
        flags = check_u64(flags, "flags")
        if flags:
            raise einval("flags must be 0")
        if attributes & ~supported_attributes(vm_type):
            raise einval(f"attributes {attributes:#x} not supported by this VM")
        if size == 0:
            raise einval("size is 0")
        if address + size > uapi.U64_MASK:
            raise einval("address + size wraps around")
        if address & _PAGE_MASK or size & _PAGE_MASK:
            raise einval("address and size must be page aligned")
        return gpa_to_gfn(address), gpa_to_gfn(address + size)

    def _span(self, gfn_start: int, gfn_end: int) -> tuple[int, int]:
        """Indexes [i, j) of the private ranges that intersect [gfn_start, gfn_end)."""
        return bisect_right(self.private.ends, gfn_start), bisect_left(self.private.starts, gfn_end)

    def pieces(self, gfn_start: int, gfn_end: int) -> list[tuple[int, int, int]]:
        """[gfn_start, gfn_end) cut into runs of equal attributes: (start, end, attributes)."""
        out: list[tuple[int, int, int]] = []
        pos = gfn_start
        i, j = self._span(gfn_start, gfn_end)
        for k in range(i, j):
            s = max(self.private.starts[k], gfn_start)
            e = min(self.private.ends[k], gfn_end)
            if pos < s:
                out.append((pos, s, 0))
            out.append((s, e, PRIVATE))
            pos = e
        if pos < gfn_end:
            out.append((pos, gfn_end, 0))
        return out

    def set(self, gfn_start: int, gfn_end: int, attributes: int) -> list[tuple[int, int, int, int]]:
        """Store `attributes` for the range; returns what changed as (start, end, old, new).

        An empty answer means every GFN already had these attributes: the kernel then returns
        0 at once (no invalidation, no zap).
        """
        changed = [
            (s, e, old, attributes)
            for s, e, old in self.pieces(gfn_start, gfn_end)
            if old != attributes
        ]
        if changed:
            if attributes & PRIVATE:
                self.private.add(gfn_start, gfn_end)
            else:
                self.private.remove(gfn_start, gfn_end)
        return changed

    def get(self, gfn: int) -> int:
        return PRIVATE if self.private.contains(gfn) else 0

    def private_mask(self, gfn_start: int, gfn_end: int) -> np.ndarray:
        """bool[gfn_end - gfn_start]: True where the GFN is private (one slice per range)."""
        mask = np.zeros(max(gfn_end - gfn_start, 0), dtype=bool)
        i, j = self._span(gfn_start, gfn_end)
        for k in range(i, j):
            s = max(self.private.starts[k], gfn_start)
            e = min(self.private.ends[k], gfn_end)
            mask[s - gfn_start : e - gfn_start] = True
        return mask

    def is_uniform(self, gfn_start: int, gfn_end: int) -> bool:
        if gfn_start >= gfn_end:
            return True
        i, j = self._span(gfn_start, gfn_end)
        if i == j:
            return True  # all shared
        return (
            j - i == 1 and self.private.starts[i] <= gfn_start and self.private.ends[i] >= gfn_end
        )

    def ranges(self) -> list[dict[str, int]]:
        """Non-default ranges, in GFN order, as the API lists them."""
        return [
            {
                "address": gfn_to_gpa(s),
                "size": pages_to_size(e - s),
                "attributes": PRIVATE,
            }
            for s, e in self.private
        ]


@operation("set_memory_attributes")
class SetMemoryAttributes(Op):
    """KVM_SET_MEMORY_ATTRIBUTES over [address, address + size)."""

    address: int
    size: int
    attributes: int
    flags: int = 0


def set_memory_attributes(vm: KvmState, op: SetMemoryAttributes) -> dict[str, Any]:
    address, size, attributes, flags = op.address, op.size, op.attributes, op.flags
    start, end = vm.attrs.check(address, size, attributes, flags, vm_type=vm.vm_type)
    attrs = int(attributes)
    if vm.attrs.pieces(start, end) == [(start, end, attrs)]:
        # Identical attributes: no invalidation at all (kvm-private-tdx.md §3.2 step 5).
        return {"zap": None, "changed": False}
    zap = None
    to_private = bool(attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    if vm.has_private_mem:
        # Zap the view being left, exactly [start, end): a huge leaf straddling the range
        # intersects it and goes too (mmu.c: only the head/tail huge regions join the
        # in-progress invalidation, the unmap itself is the changed range).
        leaving_mirror = vm.is_tdx and not to_private
        roles = {RootRole.MIRROR} if leaving_mirror else {RootRole.DIRECT}
        if any(sp.overlapping(start, end - start) for sp in vm.spaces):
            zap = zap_gfn_range(vm, [0], start, end, roles, "attributes", "zap_gfn_range")
    vm.attrs.set(start, end, attrs)
    return {"zap": zap, "changed": True}
