"""The VMM's own memory behind memslots' userspace_addr (the host side of shared memory).

A host page's pfn is derived from its address (hva >> 12), so no per-page table exists.
Only what differs from "a zero page, 4 KiB, populated on touch" is stored: written contents,
discarded (freed) ranges, and ranges with another host page size (THP advice, hugetlbfs).
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

import numpy as np

from . import addr as A
from .addr import end_page, hva_to_hpn
from .errors import MAX_DATA_BYTES, KvmError, check_u64, einval, hex_bytes
from .intervals import IntervalSet
from .op import Op, operation
from .uapi import PAGE_SIZE
from .zap import notifier_invalidate

if TYPE_CHECKING:
    from .state import KvmState

SIZE_4K = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30
LEVEL_OF_SIZE = {SIZE_4K: 1, SIZE_2M: 2, SIZE_1G: 3}


class HostMemory:
    def __init__(self) -> None:
        self.contents: dict[int, bytearray] = {}  # host page number -> bytes (written pages only)
        self.freed = IntervalSet()  # host page numbers discarded and not touched since
        # Page-size map: sorted disjoint (start_page, end_page, level, kind) runs; absent = 4 KiB.
        self._runs: list[tuple[int, int, int, str]] = []
        # Host pages of THP runs that are populated (a fault or a write touched them, no
        # discard since): a populated THP outlives MADV_NOHUGEPAGE.
        self.thp_populated = IntervalSet()

    # -- page size ------------------------------------------------------------------------
    def set_page_size(self, first: int, end: int, level: int, kind: str) -> None:
        kept: list[tuple[int, int, int, str]] = []
        for s, e, lv, k in self._runs:
            if e <= first or s >= end:
                kept.append((s, e, lv, k))
                continue
            if s < first:
                kept.append((s, first, lv, k))
            if e > end:
                kept.append((end, e, lv, k))
        if level > 1:
            kept.append((first, end, level, kind))
        self._runs = sorted(kept)

    def advise(self, first: int, end: int, hugepage: bool) -> None:
        """MADV_(NO)HUGEPAGE: THP on or off where the range is ordinary memory; hugetlbfs
        mappings ignore THP advice. MADV_NOHUGEPAGE only changes the VMA's flags
        (hugepage_madvise): a THP already populated stays, and host_pfn_mapping_level still
        finds it; only new host faults get 4 KiB pages."""
        pos = first
        for s, e, _lv, kind in list(self._runs):
            if kind != "hugetlb" or e <= first or s >= end:
                continue
            if pos < s:
                self._advise_thp(pos, s, hugepage)
            pos = max(pos, e)
        if pos < end:
            self._advise_thp(pos, end, hugepage)

    def _advise_thp(self, first: int, end: int, hugepage: bool) -> None:
        keep = self._populated_thps(first, end) if not hugepage else []
        self.set_page_size(first, end, 2 if hugepage else 1, "thp")
        for region in keep:
            # A THP left in a MADV_NOHUGEPAGE range: freed, it comes back as 4 KiB pages.
            self.set_page_size(region, region + 512, 2, "thp_nohugepage")

    def _populated_thps(self, first: int, end: int) -> list[int]:
        """2M regions of [first, end) backed by a populated THP now."""
        out = []
        for lo, hi in self.thp_populated.clipped(first, end):
            for region in range(lo & ~511, hi, 512):
                if region >= first and region + 512 <= end and self.mapping_level(region) == 2:
                    out.append(region)
        return sorted(set(out))

    def mapping_level(self, page: int) -> int:
        """Host page-table level backing `page` (THP/hugetlb only where a whole huge page fits)."""
        i = bisect_right(self._runs, (page, 1 << 62)) - 1
        if i < 0:
            return 1
        s, e, lv, _ = self._runs[i]
        if not s <= page < e:
            return 1
        while lv > 1:
            n = 1 << (9 * (lv - 1))
            base = page & ~(n - 1)
            if base >= s and base + n <= e:
                return lv
            lv -= 1
        return 1

    def mapping_levels(self, pages: np.ndarray) -> np.ndarray:
        """`mapping_level` of each of `pages` (int64) in one pass over the page-size runs."""
        out = np.ones(len(pages), dtype=np.int64)
        if not self._runs or not len(pages):
            return out
        runs = np.array([r[:3] for r in self._runs], dtype=np.int64)
        s, e, lv = runs[:, 0], runs[:, 1], runs[:, 2]
        i = np.searchsorted(s, pages, side="right") - 1
        at = np.maximum(i, 0)
        inside = (i >= 0) & (pages < e[at])
        for level in range(int(lv.max()), 1, -1):  # the largest huge page that fits whole
            n = 1 << (9 * (level - 1))
            base = pages & ~(n - 1)
            fits = inside & (out == 1) & (lv[at] >= level) & (base >= s[at]) & (base + n <= e[at])
            out[fits] = level
        return out

    def run_at(self, page: int) -> tuple[int, int]:
        """(level, end page) of the page-size run holding `page`; (1, page + 1) outside runs."""
        i = bisect_right(self._runs, (page, 1 << 62)) - 1
        if i >= 0 and self._runs[i][0] <= page < self._runs[i][1]:
            return self._runs[i][2], self._runs[i][1]
        return 1, page + 1

    def runs(self) -> list[tuple[int, int, int, str]]:
        return list(self._runs)

    def set_runs(self, runs: list[tuple[int, int, int, str]]) -> None:
        """Back from a snapshot: the page-size runs `runs()` gave."""
        self._runs = sorted(runs)

    # -- contents -------------------------------------------------------------------------
    def read(self, hva: int, length: int) -> bytes:
        out = bytearray(length)
        pos = 0
        while pos < length:
            page, off = divmod(hva + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - off, length - pos)
            data = self.contents.get(page)
            if data is not None:
                out[pos : pos + n] = data[off : off + n]
            pos += n
        return bytes(out)

    def write(self, hva: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page, off = divmod(hva + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - off, len(data) - pos)
            buf = self.contents.get(page)
            if buf is None:
                buf = self.contents[page] = bytearray(PAGE_SIZE)
            buf[off : off + n] = data[pos : pos + n]
            pos += n
        self.touch(hva_to_hpn(hva), end_page(hva, len(data)))

    def touch(self, first: int, end: int) -> None:
        """Pages faulted in again after a discard are new, populated pages; a huge host page
        (THP, hugetlbfs) is populated whole."""
        if self._runs:  # only THP regions are asked about (_populated_thps)
            self.thp_populated.add(first & ~511, -(-end // 512) * 512)
        if len(self.freed):
            lo = self.mapping_level(first)
            hi = self.mapping_level(end - 1)
            first &= ~((1 << (9 * (lo - 1))) - 1)
            n = 1 << (9 * (hi - 1))
            end = -(-end // n) * n
            self.freed.remove(first, end)

    def dontneed_range(self, first: int, end: int) -> tuple[int, int]:
        """MADV_DONTNEED on hugetlbfs: the start must be huge-page aligned (EINVAL) and the end
        is rounded down to a whole huge page (mm/madvise.c); elsewhere the range stands."""
        for s, e, lv, kind in self._runs:
            if kind != "hugetlb" or e <= first or s >= end:
                continue
            n = 1 << (9 * (lv - 1))
            if s <= first < e and (first - s) % n:
                raise einval("MADV_DONTNEED on hugetlbfs needs a huge-page-aligned start")
            if s < end <= e:
                end = max(first, s + (end - s) // n * n)
        return first, end

    def discard(self, first: int, end: int) -> int:
        """MADV_DONTNEED: drop contents, mark freed; returns pages that held data."""
        dropped = 0
        if len(self.contents) < end - first:
            for page in [p for p in self.contents if first <= p < end]:
                del self.contents[page]
                dropped += 1
        else:
            for page in range(first, end):
                if self.contents.pop(page, None) is not None:
                    dropped += 1
        self.freed.add(first, end)
        self.thp_populated.remove(first, end)
        self._split_thp(first, end)
        return dropped

    def _split_thp(self, first: int, end: int) -> None:
        """Discarding part of a transparent huge page splits it: that 2M region is mapped
        with 4K pages from now on (a wholly discarded one may be a THP again)."""
        n = 512
        for s, e, _lv, kind in list(self._runs):
            if kind == "thp_nohugepage" and s < end and e > first:
                self.set_page_size(s, e, 1, "thp")
                continue
            if kind != "thp" or e <= first or s >= end:
                continue
            for edge in {first, end}:
                region = edge & ~(n - 1)
                if s <= region < e and region < edge < region + n:
                    self.set_page_size(region, region + n, 1, "thp")


@operation("host_write")
class HostWrite(Op):
    """The VMM writes through its own mapping of guest memory."""

    userspace_addr: int
    data: str


@operation("host_discard")
class HostDiscard(Op):
    """madvise(MADV_DONTNEED) on the VMM's mapping."""

    userspace_addr: int
    len: int


@operation("host_advise")
class HostAdvise(Op):
    """madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE)."""

    userspace_addr: int
    len: int
    advice: str


@operation("host_map")
class HostMap(Op):
    """mmap() of hugetlbfs pages of `page_size` over the range."""

    userspace_addr: int
    len: int
    page_size: int


def _host_range(vm: KvmState, addr: object, length: object) -> tuple[int, int]:
    a, n = check_u64(addr, "userspace_addr"), check_u64(length, "len")
    if n == 0 or a + n > vm.user_addr_end:
        raise einval("range must be non-empty and inside the user address space")
    return a, n


def host_read(vm: KvmState, userspace_addr: object, len: object) -> dict[str, Any]:
    a, n = _host_range(vm, userspace_addr, len)
    if n > MAX_DATA_BYTES:
        raise KvmError(errno.E2BIG, "read at most 1 MiB at once")
    return {"data": vm.host.read(a, n).hex()}


def host_write(vm: KvmState, op: HostWrite) -> dict[str, Any]:
    userspace_addr, data = op.userspace_addr, op.data
    payload = hex_bytes(data)
    if len(payload) > MAX_DATA_BYTES:
        raise KvmError(errno.E2BIG, "write at most 1 MiB at once")
    a, _ = _host_range(vm, userspace_addr, max(1, len(payload)))
    if payload:
        # A write through the VMM's mapping breaks nothing KVM maps: same pfn, new bytes.
        vm.host.write(a, payload)
    return {"written": len(payload)}


def host_discard(vm: KvmState, op: HostDiscard) -> dict[str, Any]:
    """madvise(MADV_DONTNEED): the MMU notifier zaps every SPTE mapping the range."""
    userspace_addr, len = op.userspace_addr, op.len
    a, n = _host_range(vm, userspace_addr, len)
    if a & (PAGE_SIZE - 1):
        raise einval("madvise needs a page-aligned address")
    first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n + A.PAGE_MASK)
    lo, hi = vm.host.dontneed_range(first, end)
    first, end = A.Hpn(lo), A.Hpn(hi)
    if first >= end:
        return {"zap": None}
    zap = notifier_invalidate(vm, first, end)
    vm.host.discard(first, end)
    return {"zap": zap}


def host_advise(vm: KvmState, op: HostAdvise) -> dict[str, Any]:
    userspace_addr, len, advice = op.userspace_addr, op.len, op.advice
    a, n = _host_range(vm, userspace_addr, len)
    if a & (PAGE_SIZE - 1) or advice not in ("hugepage", "nohugepage"):
        raise einval("page-aligned address; advice hugepage|nohugepage")
    first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n + A.PAGE_MASK)
    # MADV_NOHUGEPAGE does not split existing THPs; KVM's SPTEs stay as they are.
    vm.host.advise(first, end, advice == "hugepage")
    return {}


def host_map(vm: KvmState, op: HostMap) -> dict[str, Any]:
    """An mmap of hugetlbfs: the range is backed by pages of `page_size`."""
    userspace_addr, len, page_size = op.userspace_addr, op.len, op.page_size
    a, n = _host_range(vm, userspace_addr, len)
    if (
        not isinstance(page_size, int)
        or isinstance(page_size, bool)
        or (page_size not in LEVEL_OF_SIZE)
    ):
        raise einval("page_size must be 4096, 2097152 or 1073741824")
    ps = int(page_size)
    if a % ps or n % ps:
        raise einval("hugetlbfs mappings are aligned to their page size")
    first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n)
    zap = notifier_invalidate(vm, first, end)
    vm.host.discard(first, end)
    vm.host.set_page_size(first, end, LEVEL_OF_SIZE[ps], "hugetlb")
    return {"zap": zap}
