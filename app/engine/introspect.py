"""Read-only views of the page tables: a page walk and run-length leaf mappings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import spte as S
from .addr import gpa_to_gfn, page_offset, pfn_to_hpa
from .errors import einval
from .paging import TablePool, path, span, walk_in_order

if TYPE_CHECKING:
    from .state import KvmState


def translate(vm: KvmState, gpa: object) -> dict[str, Any]:
    """The walk of `gpa` in every root: the entry at each level, raw and decoded."""
    if isinstance(gpa, bool) or not isinstance(gpa, int) or not 0 <= gpa < vm.gpa_limit:
        raise einval(f"gpa must be in [0, {vm.gpa_limit:#x})")
    pos: int = gpa_to_gfn(gpa)
    out = []
    for root in vm.mmu.roots_of():
        p = pos
        if vm.is_tdx:
            # Both aliases name one GFN; each root is walked at its own position.
            gfn = pos & ~vm.gfn_direct_bits
            p = gfn if root.role.value == "mirror" else gfn | vm.gfn_direct_bits
        walk = []
        leaf = None
        for table, i, level, e in path(vm.mmu.pool, root.table, p):
            d = S.decode(e, level)
            d["index"] = i
            d["table_pfn"] = vm.mmu.pool.pfn(table)
            walk.append(d)
            if e & S.SPTE_MMU_PRESENT and (level == 1 or e & S.EPT_PS):
                pfn = S.pfn_of(e) + (p & (span(level) - 1))
                leaf = {
                    "level": level,
                    "pfn": pfn,
                    "hpa": pfn_to_hpa(pfn) | page_offset(gpa),
                    "r": bool(e & S.EPT_R),
                    "w": bool(e & S.EPT_W),
                    "x": bool(e & S.EPT_X),
                }
        out.append(
            {
                "root": root.id,
                "role": root.role.value,
                "as_id": root.as_id,
                "valid": root.valid,
                "walk": walk,
                "leaf": leaf,
            }
        )
    return {"gpa": gpa, "gfn": pos & ~vm.gfn_direct_bits, "roots": out}


# Where a page of runs begins: (root id, GFN position); the first run at or after it.
MappingStart = tuple[int, int]
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
class _Run:
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


def _root_runs(pool: TablePool, table: int, start: int) -> Iterator[_Run]:
    run: _Run | None = None
    for level, gfns, ent in _leaves_in_order(pool, table, start):
        for position, pfn, perm, npages in _pieces(level, gfns, ent):
            if run is not None and run.continued_by(level, position, pfn, perm):
                run.npages += npages
                continue
            if run is not None:
                yield run
            run = _Run(level, position, pfn, perm, npages)
    if run is not None:
        yield run


def iter_mappings(
    vm: KvmState, root: object = None, start: MappingStart = (0, 0)
) -> Iterator[dict[str, Any]]:
    """Run-length leaf mappings in (root id, position) order, from the first run at or
    after `start`: consecutive GFNs at one level with consecutive pfns and the same
    permission bits form one run. Lazy: a page of runs walks only the tables it covers."""
    for r in vm.mmu.roots_of():
        if (root is not None and r.id != root) or r.id < start[0]:
            continue
        for run in _root_runs(vm.mmu.pool, r.table, start[1] if r.id == start[0] else 0):
            yield {
                "root": r.id,
                "role": r.role.value,
                "level": run.level,
                "gfn": run.position & ~vm.gfn_direct_bits,
                "position": run.position,
                "pfn": run.pfn,
                "npages": run.npages,
                "r": bool(run.perm & S.EPT_R),
                "w": bool(run.perm & S.EPT_W),
                "x": bool(run.perm & S.EPT_X),
            }


def mappings(vm: KvmState, root: object = None) -> list[dict[str, Any]]:
    """Every run of `iter_mappings`."""
    return list(iter_mappings(vm, root))
