"""TDP roots and the page-table primitives every MMU operation is built from.

Roots are typed by role: DIRECT (shared; the only role outside TDX) and MIRROR (TDX private,
KVM's copy of the S-EPT). A root is valid until invalidated by a fast zap (`mmu_valid_gen`
moves on); vCPUs then load a fresh root on their next fault.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from . import spte as S
from .paging import ENTRIES, Cursor, Step, TablePool, clip, path, span, walk, walk_in_order
from .trace import NONPRESENT, Link, TraceRing


class RootRole(enum.StrEnum):
    DIRECT = "direct"
    MIRROR = "mirror"


@dataclass(slots=True)
class Root:
    id: int
    as_id: int
    role: RootRole
    level: int
    table: int
    gen: int
    valid: bool = True
    leaves: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # by level 1..3
    gmem_leaves: int = 0  # 4K leaves mapping guest_memfd pages (kept when Mmu.count_gmem)


_ROLE_NAMES = tuple(sorted(r.value for r in RootRole))
_NO_LEAVES = (0, 0, 0, 0)


@dataclass(slots=True)
class ZapAcc:
    """What a zap did, accumulated over every table it touched."""

    leaves: dict[str, list[int]] = field(default_factory=dict)  # root role -> counts by level
    tables_freed: int = 0
    flush: bool = False  # something was zapped in a valid root
    runs: list[tuple[int, int, RootRole]] = field(default_factory=list)  # zapped GFN positions
    mirror_runs: list[tuple[int, int]] = field(default_factory=list)

    def count(self, role: RootRole, level: int, n: int) -> None:
        self.leaves.setdefault(role.value, [0, 0, 0, 0])[level] += n

    def total(self) -> int:
        return sum(sum(v) for v in self.leaves.values())

    def by_level(self) -> dict[str, object]:
        out: dict[str, object] = {}
        tot = [0, 0, 0, 0]
        for role in _ROLE_NAMES:
            v = self.leaves.get(role, _NO_LEAVES)
            out[role] = {"4k": v[1], "2m": v[2], "1g": v[3]}
            tot = [a + b for a, b in zip(tot, v, strict=True)]
        out.update({"4k": tot[1], "2m": tot[2], "1g": tot[3]})
        return out


@dataclass(slots=True)
class LeafBlock:
    """Tables of one `level` (rows, GFN position of each one's entry 0) whose entries
    [lo, hi) a walk visits."""

    level: int
    rows: np.ndarray
    bases: np.ndarray
    lo: int
    hi: int

    def gfns(self) -> np.ndarray:
        """GFN position of each visited entry (len(rows) x (hi - lo))."""
        i = np.arange(self.lo, self.hi, dtype=np.int64) * span(self.level)
        out: np.ndarray = self.bases.astype(np.int64)[:, None] + i
        return out


def index_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) in a sorted index array."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(idx) - 1]))
    return [(int(idx[s]), int(idx[e]) + 1) for s, e in zip(starts, ends, strict=True)]


# A split's children: entry k of a table split from a level-L leaf maps PFN + k * span(L - 1).
SMALL_OFFSETS = {
    lv: np.arange(512, dtype=np.uint64) * np.uint64(span(lv)) << S.U_SHIFT for lv in (1, 2)
}


def _table_runs(
    bases: np.ndarray, leaf: np.ndarray, per: np.ndarray, role: RootRole
) -> list[tuple[int, int, RootRole]]:
    """The runs `_zap_leaves` records for leaf tables zapped at once (row k at GFN position
    bases[k], its zapped entries `leaf[k]`): consecutive entries, never across tables."""
    full = per == ENTRIES
    starts, ends = bases[full], bases[full] + ENTRIES
    part = np.flatnonzero(~full & (per > 0))
    if len(part):
        flat = np.flatnonzero(leaf[part].ravel())
        gfns = bases[part][flat >> 9] + (flat & 511)
        cut = np.flatnonzero((np.diff(flat) != 1) | ((flat[1:] & 511) == 0)) + 1
        s = gfns[np.concatenate(([0], cut))]
        e = gfns[np.concatenate((cut - 1, [len(flat) - 1]))] + 1
        order = np.argsort(np.concatenate((starts, s)), kind="stable")
        starts, ends = np.concatenate((starts, s))[order], np.concatenate((ends, e))[order]
    return list(zip(starts.tolist(), ends.tolist(), repeat(role)))


class Mmu:
    def __init__(self, root_level: int) -> None:
        self.pool = TablePool()
        self.root_level = root_level
        self.roots: dict[int, Root] = {}
        self.next_root_id = 1
        self.mmu_valid_gen = 0
        self.pages = [0, 0, 0, 0]  # present leaves by level, every root (pages_4k/2m/1g)
        # SW_PROTECTED-like VMs hold private (guest_memfd) and shared leaves in one root: count
        # the guest_memfd ones as they come and go so stats need no walk.
        self.count_gmem = False
        # Engine revision ≥ 2: a fault under a huge leaf splits it (Vm sets these two).
        self.split_on_fault = True
        self.nx_huge_pages = False  # host.nx_huge_pages: 4K children of a split are executable
        self.trace = TraceRing()
        self._untraced = False  # the caller traced a teardown in the kernel's order already
        # Whole leaf tables are built and zapped a level-2 table at a time; False keeps the
        # general path (one table at a time), which the property tests compare it with.
        self.bulk = True

    # -- roots --------------------------------------------------------------------------------
    def valid_root(self, as_id: int, role: RootRole) -> Root | None:
        for r in self.roots.values():
            if r.valid and r.as_id == as_id and r.role is role:
                return r
        return None

    def get_root(self, as_id: int, role: RootRole) -> Root:
        root = self.valid_root(as_id, role)
        if root is None:
            rid = self.next_root_id
            self.next_root_id += 1
            table = self.pool.alloc(self.root_level, 0, rid)
            root = Root(rid, as_id, role, self.root_level, table, self.mmu_valid_gen)
            self.roots[rid] = root
        return root

    def roots_of(
        self, as_id: int | None = None, role: RootRole | None = None, only_valid: bool = False
    ) -> list[Root]:
        # `roots` holds them in id order: ids grow as roots are made, a snapshot restores
        # them sorted, and deleting keeps the order.
        return [
            r
            for r in self.roots.values()
            if (as_id is None or r.as_id == as_id)
            and (role is None or r.role is role)
            and (r.valid or not only_valid)
        ]

    def free_root(self, root: Root, acc: ZapAcc, *, shared: bool = True) -> None:
        """Tear a root down completely (its leaves counted as zapped) and forget it.
        `shared`: under mmu_lock for read (the fast zap), as opposed to VM teardown."""
        self.trace.root_teardown(self.pool, root.table, root.as_id, shared)
        self._untraced = True
        try:
            self.zap_range(root, 0, 1 << 62, acc, leafs_only=False)
        finally:
            self._untraced = False
        self.pool.release(root.table)
        acc.tables_freed += 1
        del self.roots[root.id]

    # -- walking --------------------------------------------------------------------------------
    def lookup(self, root: Root, pos: int) -> tuple[int, int, int, int]:
        """Deepest existing entry for GFN position `pos`: (table, index, level, entry)."""
        *_, last = path(self.pool, root.table, pos)
        return last

    def entry_at(self, root: Root, pos: int, level: int) -> tuple[int, int] | None:
        """(table, index) of the entry at exactly `level` for `pos`, if the walk reaches it."""
        for table, i, lv, _e in path(self.pool, root.table, pos):
            if lv == level:
                return table, i
        return None

    def table_for(
        self, root: Root, pos: int, level: int, acc: ZapAcc, links: list[Link] | None = None
    ) -> int:
        """The table at `level` covering `pos`, building missing tables on the way.

        A huge leaf in the way is split (kvm_tdp_mmu_map, kvm-private-tdx.md §2.5); under
        engine revision 1 it was zapped and replaced by an empty table. The new links are
        traced, or handed to `links` for the caller to trace after the fault's request.
        """
        pool = self.pool
        table, lv = root.table, root.level
        while lv > level:
            ent = pool.entries(table)
            i = (pos >> (9 * (lv - 1))) & 511
            e = int(ent[i])
            if e & S.SPTE_MMU_PRESENT and not e & S.EPT_PS:
                table = pool.child(e)
            elif e & S.SPTE_MMU_PRESENT and self.split_on_fault:
                # A huge leaf above the goal level is split (tdp_mmu_split_huge_page), its
                # translations kept; a VM of engine revision 1 zapped it instead.
                table = self.split_leaf(root, table, i, lv)
            else:
                if e & S.SPTE_MMU_PRESENT:  # huge leaf above the goal level (revision 1)
                    self._zap_leaves(root, table, i, i + 1, lv, acc)
                base = pos & ~(span(lv) - 1)
                child = pool.alloc(lv - 1, base, root.id)
                link = S.nonleaf_spte(TablePool.pfn(child))
                if links is not None:
                    links.append((base, lv, int(ent[i]), link))
                else:
                    self.trace.spte_changed(root.as_id, base, lv, int(ent[i]), link)
                ent[i] = link
                table = child
            lv -= 1
        return table

    def split_leaf(self, root: Root, table: int, i: int, level: int) -> int:
        """tdp_mmu_split_huge_page: the huge leaf at entry `i` becomes a table of 512 smaller
        leaves with its attributes, linked in its place. Returns the child table."""
        return int(self.split_leaves(root, table, np.array([i]), level)[0])

    def split_leaves(self, root: Root, table: int, idx: np.ndarray, level: int) -> np.ndarray:
        """`split_leaf` of the huge leaves at entries `idx` (ascending) of one table, in one
        pass: the same child rows, entries, links, counts and trace records as one call per
        leaf. Each child holds make_small_spte's leaves (PFN + index, PS cleared at 4K, X set
        at 4K under nx_huge_pages). Returns the child tables."""
        pool = self.pool
        ent = pool.entries(table)
        old = ent[idx]
        base = pool.gfn(table) + idx.astype(np.int64) * span(level)
        rows = pool.alloc_rows(level - 1, base.astype(np.uint64), root.id)
        small = old & ~S.U_ADDR
        if level == 2:
            small &= ~S.U_PS
            if self.nx_huge_pages:
                small |= S.U_X
        kids = (small | (old & S.U_ADDR))[:, None] + SMALL_OFFSETS[level - 1]
        pool.write_rows(rows, kids)
        if self.count_gmem and level == 2:
            gmem = ((old & S.U_ADDR) >> S.U_SHIFT) >= np.uint64(S.GMEM_PFN_BASE)
            root.gmem_leaves += 512 * int(np.count_nonzero(gmem))
        links = TablePool.links(rows)
        self.trace.huge_splits(root.as_id, base.astype(np.uint64), level, old, links)
        ent[idx] = links
        n = len(idx)
        root.leaves[level] -= n
        self.pages[level] -= n
        root.leaves[level - 1] += 512 * n
        self.pages[level - 1] += 512 * n
        return rows

    def leaf_table_run(
        self, root: Root, pos: int, n: int, links: list[Link] | None
    ) -> tuple[int, int, int, np.ndarray | None, np.ndarray | None] | None:
        """For a 512-aligned `pos`, the whole leaf tables from it on (at most `n`, within one
        level-2 table) that a fault fills without finding a present leaf: (level-2 table, i,
        j, rows, entries) where entries [i, j) of that table are all missing leaf tables
        (rows, entries None) or all leaf tables with no present leaf (their rows and a copy
        of their entries). Missing tables above level 2 are built on the way as `table_for`
        builds them. None when a huge leaf is in the way or no whole table qualifies."""
        found = self.absent_run(root, pos, n, 2, links)
        if found is None:
            return None
        table, i, j = found
        if j > i:
            return table, i, j, None, None
        ent = self.pool.entries(table)[i : i + min(n, ENTRIES - i)]
        tables = ((ent & S.U_PRESENT) != 0) & ((ent & S.U_PS) == 0)
        k = int(np.argmin(tables)) if not tables.all() else len(ent)
        rows = TablePool.children(ent[:k])
        old = self.pool.read_rows(rows)
        full = ((old & S.U_PRESENT) != 0).any(axis=1)
        k = int(np.argmax(full)) if full.any() else k
        return (table, i, i + k, rows[:k], old[:k]) if k else None

    def absent_run(
        self, root: Root, pos: int, n: int, level: int, links: list[Link] | None
    ) -> tuple[int, int, int] | None:
        """The table at `level` over `pos` (missing tables above built as `table_for` builds
        them) and the run of its non-present entries from `pos`'s on, at most `n`: (table,
        i, j), j == i when `pos`'s entry is present. None when a huge leaf above `level` is
        in the way."""
        table = self._table_above(root, pos, level, links)
        if table is None:
            return None
        i = (pos >> (9 * (level - 1))) & 511
        ent = self.pool.entries(table)[i : i + min(n, ENTRIES - i)]
        present = (ent & S.U_PRESENT) != 0
        k = int(np.argmax(present)) if present.any() else len(ent)
        return table, i, i + k

    def _table_above(
        self, root: Root, pos: int, level: int, links: list[Link] | None
    ) -> int | None:
        """The table at `level` over `pos`, missing tables above built as `table_for` builds
        them; None when a huge leaf above `level` is in the way."""
        for table, _i, lv, e in path(self.pool, root.table, pos):
            if lv == level:
                return table
            if not e & S.SPTE_MMU_PRESENT:
                return self.table_for(root, pos, level, ZapAcc(), links)
        return None  # the path ended above `level`: a huge leaf

    def link_tables(
        self, root: Root, parent: int, i: int, j: int, base: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """New tables at entries [i, j) of `parent` (covering GFN positions from `base`), one
        level below it, in the rows `table_for` would give them one by one; returns (rows,
        old parent entries, new parent entries). Their entries are for the caller."""
        level = self.pool.level(parent) - 1
        gfns = np.uint64(base) + np.arange(j - i, dtype=np.uint64) * np.uint64(span(level + 1))
        rows = self.pool.alloc_rows(level, gfns, root.id)
        ent = self.pool.entries(parent)
        old = ent[i:j].copy()
        new = TablePool.links(rows)
        ent[i:j] = new
        return rows, old, new

    # -- zapping ----------------------------------------------------------------------------------
    def _zap_leaves(
        self,
        root: Root,
        table: int,
        lo: int,
        hi: int,
        level: int,
        acc: ZapAcc,
        mask: np.ndarray | None = None,
    ) -> None:
        ent = self.pool.entries(table)[lo:hi]
        leaf = (ent & S.U_PRESENT) != 0
        if level > 1:
            leaf &= (ent & S.U_PS) != 0
        if mask is not None:
            leaf &= mask
        idx = np.flatnonzero(leaf)
        n = len(idx)
        if not n:
            return
        if self.count_gmem and level == 1:
            pfns = (ent[idx] & S.U_ADDR) >> S.U_SHIFT
            root.gmem_leaves -= int(np.count_nonzero(pfns >= np.uint64(S.GMEM_PFN_BASE)))
        base = self.pool.gfn(table) + lo * span(level)
        sp = span(level)
        if self.trace.enabled and not self._untraced:
            gfns = np.uint64(base) + idx.astype(np.uint64) * np.uint64(sp)
            self.trace.spte_changed(root.as_id, gfns, level, ent[idx], NONPRESENT)
        ent[idx] = S.NONPRESENT
        root.leaves[level] -= n
        self.pages[level] -= n
        acc.count(root.role, level, n)
        if root.valid:
            acc.flush = True
        for a, b in index_runs(idx):
            acc.runs.append((base + a * sp, base + b * sp, root.role))

    def zap_range(self, root: Root, start: int, end: int, acc: ZapAcc, *, leafs_only: bool) -> None:
        """Zap leaves intersecting [start, end) of `root`; free tables fully inside unless
        `leafs_only` (the memslot path leaves empty tables in place)."""
        self._zap_table(root, root.table, start, end, acc, leafs_only)

    def _zap_table(
        self, root: Root, table: int, start: int, end: int, acc: ZapAcc, leafs_only: bool
    ) -> None:
        """Zap the leaves under `table` intersecting [start, end) in GFN order (a table's own
        leaves between its subtrees, as tdp_iter's pre-order); free the tables wholly inside
        unless `leafs_only`. Leaf tables wholly inside go a level-2 table at a time."""
        pool = self.pool
        steps = walk_in_order(
            pool, table, start, end, post_order=not leafs_only, leaf_tables=self.bulk
        )
        for step, cur in steps:
            if step is Step.LEAVES:
                self._zap_leaves(root, cur.table, cur.lo, cur.hi, cur.level, acc)
            elif step is Step.LEAF_TABLES:
                self._zap_leaf_tables(root, cur.table, cur.lo, cur.hi, acc, leafs_only)
            elif start <= cur.gfn(cur.lo) and cur.gfn(cur.hi) <= end:  # UP: a table emptied
                ent = pool.entries(cur.table)
                pool.release(pool.child(int(ent[cur.lo])))
                acc.tables_freed += 1
                ent[cur.lo] = S.NONPRESENT

    def _zap_leaf_tables(
        self, root: Root, table: int, a: int, b: int, acc: ZapAcc, leafs_only: bool
    ) -> None:
        """The leaf tables linked at entries [a, b) of the level-2 `table`, all inside the
        zapped range, zapped in one pass (and freed unless `leafs_only`): the same leaves,
        counts, runs and trace records as one `_zap_table` per table."""
        pool = self.pool
        ent = pool.entries(table)
        sub = ent[a:b]
        pos = a + np.flatnonzero(((sub & S.U_PRESENT) != 0) & ((sub & S.U_PS) == 0))
        rows = TablePool.children(ent[pos])
        traced = self.trace.enabled and not self._untraced
        old: np.ndarray | None = None
        if leafs_only or self.count_gmem or traced:
            old = pool.read_rows(rows)
            leaf = (old & S.U_PRESENT) != 0
        else:  # freed right after and untraced: only which entries were present matters
            leaf = pool.present_rows(rows)
        n = int(np.count_nonzero(leaf))
        if n:
            bases = pool.gfn(table) + pos * ENTRIES
            self._zapped_leaf_tables(root, rows, bases, old, leaf, n, acc)
        if not leafs_only:
            pool.release_rows(rows)
            acc.tables_freed += len(rows)
            ent[pos] = S.NONPRESENT

    def _zapped_leaf_tables(
        self,
        root: Root,
        rows: np.ndarray,
        bases: np.ndarray,
        old: np.ndarray | None,
        leaf: np.ndarray,
        n: int,
        acc: ZapAcc,
    ) -> None:
        """Present leaves `leaf` of leaf tables `rows` (entries `old`) go non-present; with
        `old` None the tables are freed right after and keep their entries."""
        per = np.count_nonzero(leaf, axis=1)
        if old is not None:
            if self.count_gmem:
                pfns = (old & S.U_ADDR) >> S.U_SHIFT
                gmem = leaf & (pfns >= np.uint64(S.GMEM_PFN_BASE))
                root.gmem_leaves -= int(np.count_nonzero(gmem))
            if self.trace.enabled and not self._untraced:
                self.trace.leaves_zapped(root.as_id, bases, old, leaf, per)
            if n == leaf.size:
                self.pool.fill_rows(rows, S.NONPRESENT)
            else:
                self.pool.write_rows(rows, np.where(leaf, S.NONPRESENT, old))
        root.leaves[1] -= n
        self.pages[1] -= n
        acc.count(root.role, 1, n)
        if root.valid:
            acc.flush = True
        acc.runs.extend(_table_runs(bases, leaf, per, root.role))

    def free_table(self, root: Root, table: int, acc: ZapAcc) -> None:
        """Free a whole subtree (its leaves zapped); the caller clears the parent entry."""
        base = self.pool.gfn(table)
        level = self.pool.level(table)
        self._zap_table(root, table, base, base + span(level) * ENTRIES, acc, False)
        self.pool.release(table)
        acc.tables_freed += 1

    def replace_table(self, root: Root, parent: int, i: int, leaf: int, acc: ZapAcc) -> None:
        """A table replaced by the huge leaf `leaf` (a fault, or huge-page recovery), both
        under mmu_lock for read: the parent entry changes first, then the unlinked table's
        entries are frozen (handle_removed_pt). The caller installs the leaf."""
        old = int(self.pool.entries(parent)[i])
        level = self.pool.level(parent)
        child = self.pool.child(old)
        gfn = self.pool.gfn(parent) + i * span(level)
        self.trace.spte_changed(root.as_id, gfn, level, old, leaf)
        self.trace.removed_table(self.pool, child, root.as_id, shared=True)
        self._untraced = True
        try:
            self.free_table(root, child, acc)
        finally:
            self._untraced = False

    def replace_leaf_tables(
        self,
        root: Root,
        table: int,
        pos: np.ndarray,
        old: np.ndarray,
        leaves: np.ndarray,
        acc: ZapAcc,
    ) -> None:
        """`replace_table` then `set_leaves` of the leaf tables linked at entries `pos`
        (ascending) of the level-2 `table`, whose entries are `old` (a copy), each by the
        2 MiB leaf `leaves[k]`, in one pass: the same trace records, counts, freed rows (in
        order) and entries as one pair of calls per table."""
        pool = self.pool
        ent = pool.entries(table)
        rows = TablePool.children(ent[pos])
        bases = pool.gfn(table) + pos.astype(np.int64) * ENTRIES
        self.trace.tables_recovered(root.as_id, bases, ent[pos], leaves, old)
        leaf = (old & S.U_PRESENT) != 0
        per = np.count_nonzero(leaf, axis=1)
        n = int(per.sum())
        if self.count_gmem:
            gmem = leaf & (((old & S.U_ADDR) >> S.U_SHIFT) >= np.uint64(S.GMEM_PFN_BASE))
            root.gmem_leaves -= int(np.count_nonzero(gmem))
        root.leaves[1] -= n
        self.pages[1] -= n
        if n:
            acc.count(root.role, 1, n)
            acc.flush |= root.valid
        acc.runs.extend(_table_runs(bases, leaf, per, root.role))
        pool.release_rows(rows)
        acc.tables_freed += len(rows)
        ent[pos] = leaves
        root.leaves[2] += len(pos)
        self.pages[2] += len(pos)

    # -- leaves -----------------------------------------------------------------------------------
    def set_leaves(self, root: Root, table: int, lo: int, values: np.ndarray, level: int) -> None:
        """Install present leaves over non-present entries [lo, lo+len(values))."""
        self.pool.entries(table)[lo : lo + len(values)] = values
        n = len(values)
        root.leaves[level] += n
        self.pages[level] += n

    def leaf_iter(
        self, root: Root, start: int = 0, end: int = 1 << 62, min_level: int = 1
    ) -> Iterator[tuple[Cursor, np.ndarray, np.ndarray]]:
        """(cursor, its slice of entries, indexes of present leaves in it) per table, tables
        below `min_level` not visited."""
        for cur in walk(self.pool, root.table, start, end, min_level=min_level):
            sl = self.pool.entries(cur.table)[cur.lo : cur.hi]
            leaf = (sl & S.U_PRESENT) != 0
            if cur.level > 1:
                leaf &= (sl & S.U_PS) != 0
            idx = np.flatnonzero(leaf)
            if len(idx):
                yield cur, sl, idx

    def leaf_blocks(
        self, root: Root, start: int, end: int, min_level: int = 1
    ) -> Iterator[LeafBlock]:
        """The tables over GFN positions [start, end), in the walk's pre-order, as blocks of
        tables of one level: each table above the leaf level alone, and a level-2 table's
        leaf tables wholly inside the range together (one block after the partial first one,
        before the partial last one). Tables below `min_level` are not visited."""
        pool = self.pool
        for cur in walk(pool, root.table, start, end, min_level=max(2, min_level)):
            yield LeafBlock(cur.level, np.array([cur.table]), np.array([cur.base]), cur.lo, cur.hi)
            if cur.level != 2 or min_level > 1:
                continue
            sl = pool.entries(cur.table)[cur.lo : cur.hi]
            kids = np.flatnonzero(((sl & S.U_PRESENT) != 0) & ((sl & S.U_PS) == 0))
            rows = TablePool.children(sl[kids])
            bases = cur.base + (cur.lo + kids) * ENTRIES
            inside = np.flatnonzero((bases >= start) & (bases + ENTRIES <= end))
            # The general path (bulk off) takes each leaf table alone.
            a, b = (
                (int(inside[0]), int(inside[-1]) + 1)
                if len(inside) and self.bulk
                else (len(kids),) * 2
            )
            for k in [*range(a), -1, *range(b, len(kids))]:
                if k < 0:
                    if b > a:
                        yield LeafBlock(1, rows[a:b], bases[a:b], 0, ENTRIES)
                    continue
                lo, hi = clip(int(bases[k]), 1, start, end)
                yield LeafBlock(1, rows[k : k + 1], bases[k : k + 1], lo, hi)

    def mapped_pages(self, root: Root, start: int, end: int, *, gmem: bool = False) -> int:
        """Present leaves over GFN positions [start, end) in 4 KiB pages (only guest_memfd
        pages with `gmem`). Leaf tables wholly inside are counted a level-2 table at a time."""
        pool, n = self.pool, 0
        floor = S.GMEM_PFN_BASE if gmem else None
        for blk in self.leaf_blocks(root, start, end):
            if blk.level == 1 and (blk.lo, blk.hi) == (0, ENTRIES):  # whole tables, not copied
                n += int(pool.present_counts(blk.rows, floor).sum())
                continue
            sl = pool.read_rows(blk.rows)[:, blk.lo : blk.hi]
            leaf = (sl & S.U_PRESENT) != 0
            if blk.level > 1:
                leaf &= (sl & S.U_PS) != 0
            n += _count(sl, leaf, floor) * span(blk.level)
        return n


def _count(entries: np.ndarray, leaf: np.ndarray, min_pfn: int | None) -> int:
    """Leaves `leaf` of `entries`, those with a PFN of at least `min_pfn` if given."""
    if min_pfn is not None:
        leaf = leaf & (((entries & S.U_ADDR) >> S.U_SHIFT) >= np.uint64(min_pfn))
    return int(np.count_nonzero(leaf))
