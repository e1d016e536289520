"""The walk under the mappings view (views.py): a root's present leaves in GFN order, cut into
run-length runs, vectorised per page-table page. Works on a `TablePool` alone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import spte as S
from .paging import TablePool, span, walk_in_order

_PERMS = np.uint64(S.EPT_R | S.EPT_W | S.EPT_X)


def _leaves_in_order(
    pool: TablePool, table: int, start: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(level, GFN positions, entries) of the present leaves under `table` at positions
    `start` and up, in GFN order: a table's own leaves interleaved with its children's, so
    a walk can stop anywhere and resume from a position."""
    for _step, cur in walk_in_order(pool, table, start, 1 << 62):  # LEAVES only: no options
        ent = pool.entries(cur.table)[cur.lo : cur.hi]
        gfns = cur.base + np.arange(cur.lo, cur.hi, dtype=np.int64) * span(cur.level)
        # A leaf beginning below `start` (a huge one over it) belongs to an earlier page.
        sel = np.flatnonzero(((ent & S.U_PRESENT) != 0) & (gfns >= start))
        if len(sel):
            yield cur.level, gfns[sel], ent[sel]


@dataclass(slots=True)
class Run:
    """`npages` 4 KiB pages from GFN position `position` at `level`, pfns from `pfn` on,
    permission bits `perm` (EPT R/W/X)."""

    level: int
    position: int
    pfn: int
    perm: int
    npages: int

    def continued_by(self, level: int, position: int, pfn: int, perm: int) -> bool:
        return (
            level == self.level
            and position == self.position + self.npages
            and pfn == self.pfn + self.npages
            and perm == self.perm
        )


def _pieces(level: int, gfns: np.ndarray, ent: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """(position, pfn, permission bits, 4 KiB pages) of each stretch of consecutive GFNs
    with consecutive pfns and the same permissions (vectorised per table)."""
    sp = span(level)
    pfns = ((ent & S.U_ADDR) >> S.U_SHIFT).astype(np.int64)
    perms = ent & _PERMS
    brk = np.ones(len(gfns), dtype=bool)
    brk[1:] = (np.diff(gfns) != sp) | (np.diff(pfns) != sp) | (perms[1:] != perms[:-1])
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], len(gfns))
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(gfns[a]), int(pfns[a]), int(perms[a]), (b - a) * sp


def root_runs(pool: TablePool, table: int, start: int) -> Iterator[Run]:
    """The runs of leaves under root table `table` from GFN position `start` on, in GFN
    order: consecutive GFNs at one level with consecutive pfns and the same permission bits
    form one run. Lazy: stopping early walks only the tables the runs cover."""
    run: Run | None = None
    for level, gfns, ent in _leaves_in_order(pool, table, start):
        for position, pfn, perm, npages in _pieces(level, gfns, ent):
            if run is not None and run.continued_by(level, position, pfn, perm):
                run.npages += npages
                continue
            if run is not None:
                yield run
            run = Run(level, position, pfn, perm, npages)
    if run is not None:
        yield run
