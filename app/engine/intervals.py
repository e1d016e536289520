"""A set of disjoint half-open integer intervals, for sparse per-page state kept per run."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

import numpy as np


class IntervalSet:
    __slots__ = ("starts", "ends")

    def __init__(self, pairs: list[tuple[int, int]] | None = None) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for s, e in pairs or []:
            self.add(s, e)

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self.starts, self.ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in self)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect_left(self.ends, start)  # first interval ending at/after start (touching merges)
        j = bisect_right(self.starts, end)  # intervals starting at/before end
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def add_many(self, pairs: list[tuple[int, int]]) -> None:
        """`add` of every pair, merged in one sorted pass (a zap of many leaf tables)."""
        if len(pairs) < 64:
            for s, e in pairs:
                self.add(s, e)
            return
        new = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        new = new[new[:, 0] < new[:, 1]]
        lo = np.concatenate((np.array(self.starts, dtype=np.int64), new[:, 0]))
        hi = np.concatenate((np.array(self.ends, dtype=np.int64), new[:, 1]))
        if not len(lo):
            return
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], np.maximum.accumulate(hi[order])
        # A run starting at or before the end of those before it joins them (touching merges).
        cut = np.flatnonzero(lo[1:] > hi[:-1]) + 1
        self.starts = lo[np.concatenate(([0], cut))].tolist()
        self.ends = hi[np.concatenate((cut - 1, [len(lo) - 1]))].tolist()

    def remove(self, start: int, end: int) -> int:
        """Remove [start, end); return how many integers were removed."""
        if start >= end:
            return 0
        i = bisect_right(self.ends, start)
        j = bisect_left(self.starts, end)
        if i >= j:
            return 0
        removed = 0
        new_s: list[int] = []
        new_e: list[int] = []
        for s, e in zip(self.starts[i:j], self.ends[i:j], strict=True):
            removed += min(e, end) - max(s, start)
            if s < start:
                new_s.append(s)
                new_e.append(start)
            if e > end:
                new_s.append(end)
                new_e.append(e)
        self.starts[i:j] = new_s
        self.ends[i:j] = new_e
        return removed

    def clipped(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of the set inside [start, end), found by bisection."""
        i = bisect_right(self.ends, start)
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            out.append((max(self.starts[i], start), min(self.ends[i], end)))
            i += 1
        return out

    def mask(self, start: int, count: int) -> np.ndarray:
        """bool[count]: which of start … start+count-1 are in the set."""
        out = np.zeros(count, dtype=bool)
        for s, e in self.clipped(start, start + count):
            out[s - start : e - start] = True
        return out

    def overlap(self, start: int, end: int) -> int:
        i = bisect_right(self.ends, start)
        total = 0
        while i < len(self.starts) and self.starts[i] < end:
            total += min(self.ends[i], end) - max(self.starts[i], start)
            i += 1
        return total

    def overlaps(self, starts: np.ndarray, n: int) -> np.ndarray:
        """`overlap(s, s + n) > 0` for each of `starts` (int64), in one pass."""
        if not self.starts:
            return np.zeros(len(starts), dtype=bool)
        lo = np.array(self.starts, dtype=np.int64)
        hi = np.array(self.ends, dtype=np.int64)
        i = np.searchsorted(hi, starts, side="right")  # the first run ending after each start
        hit: np.ndarray = i < len(hi)
        hit[hit] = lo[i[hit]] < starts[hit] + n
        return hit

    def contains(self, x: int) -> bool:
        i = bisect_right(self.starts, x) - 1
        return i >= 0 and x < self.ends[i]

    def to_list(self) -> list[list[int]]:
        return [[s, e] for s, e in self]
