"""Page-table pages and the walk over a GFN range (the shape of tdp_iter).

A page-table page is one row of 512 uint64 EPT entries. Rows live in fixed-size chunks so the
pool grows without copying and without a Python object per table; a table's pfn is
TABLE_PFN_BASE + its row index, which is what a non-leaf SPTE points to.

Traversals are loops over one of three views of the same descent: `walk` (a cursor per table,
pre- or post-order), `walk_in_order` (a table's entries cut at its links, interleaved with the
subtrees in GFN order, each link optionally named before and after its subtree) and `path`
(the descent to one GFN).
"""

from __future__ import annotations

import enum
import mmap
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

# numpy imports numpy.ma lazily, inside the first `np.unique`: ~16 ms that would land on the
# first fault of a fresh process (a first-call penalty). Imported with the engine instead.
import numpy.ma  # noqa: F401

from . import spte as S

ENTRIES = 512
CHUNK_SHIFT = 10
CHUNK = 1 << CHUNK_SHIFT
_CHUNK_MASK = CHUNK - 1
_IDX = np.arange(ENTRIES, dtype=np.uint64)
_PRESENT = np.uint64(S.SPTE_MMU_PRESENT)


class SpareChunks:
    """Entry chunks of dropped pools, kept for the next pool that grows.

    A fresh chunk pays a page fault per 4 KiB at first touch, inside the call that grows the
    pool: 0.5-2.8 ms per MiB measured in a Firecracker guest, whose host takes free memory
    back (free page reporting). A kept chunk is handed out as its last pool left it, not
    zeroed: a pool writes every row before reading it (`alloc` fills its row, the callers of
    `alloc_rows` write all of theirs) and reads no row at or past its top, and zeroing all
    of a chunk would fault in the pages its last pool never touched (a 2 MiB-backed fault
    of 16 GiB, which writes 18 tables, spent 0.45 ms zeroing). At most `limit` chunks are
    kept, and one that something still views (a snapshot being written, say) is never
    reused: that is checked when it is taken, once the dropped VM's own references are
    gone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[np.ndarray] = []
        self._lock = threading.Lock()

    def keep(self, chunks: list[np.ndarray]) -> None:
        """A dropped pool's chunks (its finalizer: the pool is gone, its list is not), in the
        order it grew into them: all are full but the last, whose untouched pages would
        still fault. The first are kept, and taken first."""
        with self._lock:
            room = max(0, self.limit - len(self._chunks))  # a negative slice would keep some
            self._chunks.extend(reversed(chunks[:room]))
        chunks.clear()

    def take(self) -> np.ndarray:
        """A chunk: a kept one with whatever its last pool wrote, or a fresh one."""
        while True:
            with self._lock:
                if not self._chunks:
                    return _entries_chunk()
                chunk = self._chunks.pop()
            # Unviewed, the chunk is referenced by `chunk` and getrefcount's argument only,
            # its buffer array by the chunk and the argument; a view adds to the latter.
            if sys.getrefcount(chunk) == 2 and sys.getrefcount(chunk.base) == 2:
                return chunk

    def __len__(self) -> int:
        return len(self._chunks)


def _entries_chunk() -> np.ndarray:
    """A chunk's entries in an anonymous private mapping of its own: numpy madvises
    allocations of 4 MiB and more MADV_HUGEPAGE, whose first touch compacts memory
    synchronously (page-table memory is written once per table, huge pages buy nothing)."""
    buf = mmap.mmap(-1, CHUNK * ENTRIES * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=np.uint64).reshape(CHUNK, ENTRIES)


# 64 MiB: the leaf tables of a 32 GiB guest mapped at 4 KiB.
SPARE = SpareChunks(limit=16)


def recycle_when_dropped(owner: object, chunks: list[np.ndarray]) -> None:
    """Give `chunks` to the spare list once `owner` (their only user) is dropped."""
    weakref.finalize(owner, SPARE.keep, chunks)


def span(level: int) -> int:
    """GFNs covered by one entry of a table at `level`."""
    return 1 << (9 * (level - 1))


class TablePool:
    """Every page-table page of one VM, all roots included."""

    def __init__(self) -> None:
        self._entries: list[np.ndarray] = []  # each uint64[CHUNK, 512]
        self._level: list[np.ndarray] = []  # uint8[CHUNK]; 0 = free row
        self._gfn: list[np.ndarray] = []  # uint64[CHUNK]: first GFN position the table covers
        self._root: list[np.ndarray] = []  # int32[CHUNK]: owning root id
        self._free: list[int] = []
        self._top = 0
        self.live = 0
        recycle_when_dropped(self, self._entries)

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, level: int, gfn: int, root: int) -> int:
        if self._free:
            idx = self._free.pop()
        else:
            idx = self._top
            self._top += 1
            self._grow(idx + 1)
        c, r = idx >> CHUNK_SHIFT, idx & _CHUNK_MASK
        self._entries[c][r].fill(S.NONPRESENT)
        self._level[c][r] = level
        self._gfn[c][r] = gfn
        self._root[c][r] = root
        self.live += 1
        return idx

    def _grow(self, rows: int) -> None:
        """Chunks for rows [0, rows)."""
        while len(self._entries) << CHUNK_SHIFT < rows:
            self._entries.append(SPARE.take())
            self._level.append(np.zeros(CHUNK, dtype=np.uint8))
            self._gfn.append(np.zeros(CHUNK, dtype=np.uint64))
            self._root.append(np.zeros(CHUNK, dtype=np.int32))

    def alloc_rows(self, level: int, gfns: np.ndarray, root: int) -> np.ndarray:
        """Rows for len(gfns) tables, the same rows in the same order as that many `alloc`
        calls (free rows last-freed first, then new ones). Entries are left unwritten: the
        caller writes every one (`write_rows`)."""
        n = len(gfns)
        k = min(n, len(self._free))
        reused = np.asarray(self._free[len(self._free) - k :][::-1], dtype=np.int64)
        del self._free[len(self._free) - k :]
        idx = np.concatenate((reused, np.arange(self._top, self._top + n - k, dtype=np.int64)))
        self._top += n - k
        self._grow(self._top)
        for c, sel, r in self._by_chunk(idx):
            self._level[c][r] = level
            self._gfn[c][r] = gfns[sel]
            self._root[c][r] = root
        self.live += n
        return idx

    def _by_chunk(self, idx: np.ndarray) -> Iterator[tuple[int, slice | np.ndarray, np.ndarray]]:
        """(chunk, positions in `idx`, rows in the chunk) per chunk `idx` touches."""
        ch = idx >> CHUNK_SHIFT
        if len(ch) and ch[0] == ch[-1] and np.all(ch == ch[0]):
            yield int(ch[0]), slice(None), idx & _CHUNK_MASK
            return
        for c in np.unique(ch).tolist():
            sel = np.flatnonzero(ch == c)
            yield c, sel, idx[sel] & _CHUNK_MASK

    def write_rows(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Rows `idx` get `values` (one row of 512 entries per index)."""
        for c, sel, r in self._by_chunk(idx):
            self._entries[c][r] = values[sel]

    def write_leaf_rows(self, idx: np.ndarray, pfn0: int, bits: int, level: int = 1) -> None:
        """Row k of `idx` gets the leaves of `level`, bits | (pfn0 + (512k + i) * span(level))
        << 12, computed in place."""
        sp = np.uint64(span(level))
        for c, sel, r in self._by_chunk(idx):
            k = np.arange(len(idx), dtype=np.uint64)[sel]
            contiguous = len(r) and bool(np.all(np.diff(r) == 1))  # ascending, no gap
            dest = self._entries[c][int(r[0]) : int(r[-1]) + 1] if contiguous else None
            out = np.empty((len(r), ENTRIES), dtype=np.uint64) if dest is None else dest
            np.add((k * np.uint64(ENTRIES) * sp + np.uint64(pfn0))[:, None], _IDX * sp, out=out)
            out <<= np.uint64(S.PFN_SHIFT)
            out |= np.uint64(bits)
            if dest is None:
                self._entries[c][r] = out

    def fill_rows(self, idx: np.ndarray, value: np.uint64) -> None:
        """Every entry of rows `idx` becomes `value`."""
        for c, _sel, r in self._by_chunk(idx):
            self._entries[c][r] = value

    def read_rows(self, idx: np.ndarray) -> np.ndarray:
        """A copy of rows `idx` (len(idx) x 512)."""
        out = np.empty((len(idx), ENTRIES), dtype=np.uint64)
        for c, sel, r in self._by_chunk(idx):
            out[sel] = self._entries[c][r]
        return out

    def _rows(self, c: int, r: np.ndarray) -> np.ndarray:
        """Rows `r` of chunk `c`: a view when they are consecutive and ascending (tables
        allocated together), else a copy."""
        if len(r) and int(r[-1]) - int(r[0]) == len(r) - 1 and bool(np.all(np.diff(r) == 1)):
            view: np.ndarray = self._entries[c][int(r[0]) : int(r[-1]) + 1]
            return view
        copy: np.ndarray = self._entries[c][r]
        return copy

    def present_counts(self, idx: np.ndarray, min_pfn: int | None = None) -> np.ndarray:
        """Present entries per row of `idx` (with a PFN of at least `min_pfn` if given),
        without copying rows allocated together."""
        out = np.empty(len(idx), dtype=np.int64)
        for c, sel, r in self._by_chunk(idx):
            rows = self._rows(c, r)
            keep = (rows & _PRESENT) != 0
            if min_pfn is not None:
                keep &= ((rows & S.U_ADDR) >> S.U_SHIFT) >= np.uint64(min_pfn)
            out[sel] = np.count_nonzero(keep, axis=1)
        return out

    def present_rows(self, idx: np.ndarray) -> np.ndarray:
        """The present-entry mask of rows `idx` (len(idx) x 512 bools)."""
        out = np.empty((len(idx), ENTRIES), dtype=bool)
        for c, sel, r in self._by_chunk(idx):
            out[sel] = (self._rows(c, r) & _PRESENT) != 0
        return out

    def release_rows(self, idx: np.ndarray) -> None:
        """`release` of each row of `idx`, in order."""
        for c, _sel, r in self._by_chunk(idx):
            self._level[c][r] = 0
        self._free.extend(idx.tolist())
        self.live -= len(idx)

    def release(self, idx: int) -> None:
        c, r = idx >> CHUNK_SHIFT, idx & _CHUNK_MASK
        self._level[c][r] = 0
        self._free.append(idx)
        self.live -= 1

    # -- access -----------------------------------------------------------------------------
    def entries(self, idx: int) -> np.ndarray:
        row: np.ndarray = self._entries[idx >> CHUNK_SHIFT][idx & _CHUNK_MASK]
        return row

    def level(self, idx: int) -> int:
        return int(self._level[idx >> CHUNK_SHIFT][idx & _CHUNK_MASK])

    def gfn(self, idx: int) -> int:
        return int(self._gfn[idx >> CHUNK_SHIFT][idx & _CHUNK_MASK])

    def root(self, idx: int) -> int:
        return int(self._root[idx >> CHUNK_SHIFT][idx & _CHUNK_MASK])

    def is_live(self, idx: int) -> bool:
        return 0 <= idx < self._top and self.level(idx) != 0

    @staticmethod
    def pfn(idx: int) -> int:
        return S.TABLE_PFN_BASE + idx

    def child(self, entry: int) -> int:
        return S.pfn_of(entry) - S.TABLE_PFN_BASE

    @staticmethod
    def children(entries: np.ndarray) -> np.ndarray:
        """`child` of each non-leaf entry of `entries`: the rows they link (int64)."""
        rows: np.ndarray = (
            ((entries & S.U_ADDR) >> S.U_SHIFT) - np.uint64(S.TABLE_PFN_BASE)
        ).astype(np.int64)
        return rows

    @staticmethod
    def links(rows: np.ndarray) -> np.ndarray:
        """The non-leaf SPTEs that point at tables `rows` (`children`' inverse)."""
        pfns = np.uint64(S.TABLE_PFN_BASE) + rows.astype(np.uint64)
        out: np.ndarray = (pfns << S.U_SHIFT) | np.uint64(S.nonleaf_spte(0))
        return out

    # -- snapshots --------------------------------------------------------------------------
    def export_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The live rows chunk by chunk (views where a chunk is full): a snapshot writes them
        one chunk at a time and never holds a second copy of every table."""
        for c in range(len(self._entries)):
            n = min(CHUNK, self._top - (c << CHUNK_SHIFT))
            if n <= 0:
                break
            live = np.flatnonzero(self._level[c][:n])
            sel: slice | np.ndarray = slice(0, n) if len(live) == n else live
            yield {
                "idx": live + (c << CHUNK_SHIFT),
                "entries": self._entries[c][sel],
                "level": self._level[c][sel],
                "gfn": self._gfn[c][sel],
                "root": self._root[c][sel],
            }

    def copy_chunks(self, spare: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """`export_chunks` copied. A full chunk's entries go into a spare chunk (memory that is
        already faulted in), appended to `spare` for the caller to give back once the copies
        are dropped (`recycle_when_dropped`)."""
        out = []
        for chunk in self.export_chunks():
            copied = {}
            for key, a in chunk.items():
                if key == "entries" and a.shape == (CHUNK, ENTRIES):
                    copied[key] = dst = SPARE.take()
                    np.copyto(dst, a)
                    spare.append(dst)
                else:
                    copied[key] = np.array(a)
            out.append(copied)
        return out

    @property
    def top(self) -> int:
        return self._top

    @property
    def free_rows(self) -> list[int]:
        return list(self._free)

    @classmethod
    def restore_chunks(
        cls, top: int, free: list[int], chunks: Iterable[dict[str, np.ndarray]]
    ) -> TablePool:
        """The pool `export_chunks` wrote, rows back at their indexes."""
        pool = cls()
        pool._grow(top)
        live = 0
        for d in chunks:
            idx = d["idx"].astype(np.int64)
            if not len(idx):
                continue
            c = int(idx[0]) >> CHUNK_SHIFT
            if c >= len(pool._entries) or np.any((idx >> CHUNK_SHIFT) != c):
                raise ValueError("table rows outside their chunk")
            r = idx & _CHUNK_MASK
            pool._entries[c][r] = d["entries"]
            pool._level[c][r] = d["level"]
            pool._gfn[c][r] = d["gfn"]
            pool._root[c][r] = d["root"]
            live += len(idx)
        pool._top = top
        pool._free = [int(x) for x in free]
        pool.live = live
        return pool

    def export(self) -> dict[str, np.ndarray]:
        """Live rows only, copied chunk by chunk (no per-table Python work)."""
        ent, lv, gf, rt, idx = [], [], [], [], []
        for c in range(len(self._entries)):
            n = min(CHUNK, self._top - (c << CHUNK_SHIFT))
            if n <= 0:
                break
            live = np.flatnonzero(self._level[c][:n])
            if len(live) == n:
                sel: slice | np.ndarray = slice(0, n)
            else:
                sel = live
            ent.append(self._entries[c][sel])
            lv.append(self._level[c][sel])
            gf.append(self._gfn[c][sel])
            rt.append(self._root[c][sel])
            idx.append(live + (c << CHUNK_SHIFT))
        cat = np.concatenate
        return {
            "idx": cat(idx) if idx else np.zeros(0, np.int64),
            "entries": cat(ent) if ent else np.zeros((0, ENTRIES), np.uint64),
            "level": cat(lv) if lv else np.zeros(0, np.uint8),
            "gfn": cat(gf) if gf else np.zeros(0, np.uint64),
            "root": cat(rt) if rt else np.zeros(0, np.int32),
            "free": np.asarray(self._free, dtype=np.int64),
            "top": np.asarray([self._top], dtype=np.int64),
        }

    @classmethod
    def restore(cls, d: dict[str, np.ndarray]) -> TablePool:
        pool = cls()
        top = int(d["top"][0])
        pool._grow(top)
        idxs = d["idx"].astype(np.int64)
        chunk_of = idxs >> CHUNK_SHIFT
        for c in np.unique(chunk_of):
            rows = np.flatnonzero(chunk_of == c)
            r = idxs[rows] & _CHUNK_MASK
            pool._entries[c][r] = d["entries"][rows]
            pool._level[c][r] = d["level"][rows]
            pool._gfn[c][r] = d["gfn"][rows]
            pool._root[c][r] = d["root"][rows]
        pool._top = top
        pool._free = [int(x) for x in d["free"]]
        pool.live = len(idxs)
        return pool


@dataclass(slots=True)
class Cursor:
    """One page-table page and the slice [lo, hi) of its entries that intersect the walk."""

    table: int
    level: int
    base: int  # GFN position of entry 0
    lo: int
    hi: int

    def gfn(self, i: int) -> int:
        return self.base + i * span(self.level)


def clip(base: int, level: int, start: int, end: int) -> tuple[int, int]:
    """Entry slice of a table at `level` whose coverage intersects [start, end)."""
    s = span(level)
    lo = max(0, (start - base) // s)
    hi = min(ENTRIES, -(-(end - base) // s))
    return lo, hi


def path(pool: TablePool, table: int, pos: int) -> Iterator[tuple[int, int, int, int]]:
    """The entries over GFN position `pos` from `table` down, one per level: (table, index,
    level, entry), the last one non-present, a huge leaf or at level 1 (`walk` narrowed to
    one GFN, without its cursors: lookups run on every fault)."""
    level = pool.level(table)
    while True:
        i = (pos >> (9 * (level - 1))) & 511
        e = int(pool.entries(table)[i])
        yield table, i, level, e
        if level == 1 or not e & S.SPTE_MMU_PRESENT or e & S.EPT_PS:
            return
        table, level = pool.child(e), level - 1


def walk(
    pool: TablePool, table: int, start: int, end: int, min_level: int = 1, post_order: bool = False
) -> Iterator[Cursor]:
    """Yield a cursor for every table reachable from `table` intersecting [start, end).

    Descends through present non-leaf entries down to `min_level`. Pre-order by default;
    post-order yields children before their parent (what teardown needs).
    """
    level = pool.level(table)
    base = pool.gfn(table)
    lo, hi = clip(base, level, start, end)
    if lo >= hi:
        return
    cur = Cursor(table, level, base, lo, hi)
    if not post_order:
        yield cur
    if level > min_level:
        ent = pool.entries(table)[lo:hi]
        nonleaf = np.flatnonzero((ent & S.U_PRESENT != 0) & (ent & S.U_PS == 0))
        for j in nonleaf:
            child = pool.child(int(ent[j]))
            yield from walk(pool, child, start, end, min_level, post_order)
    if post_order:
        yield cur


class Step(enum.Enum):
    """What a `walk_in_order` cursor holds."""

    LEAVES = "leaves"  # entries linking no table: every present one is a leaf
    LEAF_TABLES = "leaf_tables"  # level-2 entries linking leaf tables, left to the caller
    DOWN = "down"  # the link [lo, lo + 1) whose subtree comes next (pre-order)
    UP = "up"  # the link [lo, lo + 1) whose subtree was just walked (post-order)


def walk_in_order(
    pool: TablePool,
    table: int,
    start: int,
    end: int,
    *,
    pre_order: bool = False,
    post_order: bool = False,
    leaf_tables: bool = False,
) -> Iterator[tuple[Step, Cursor]]:
    """The entries under `table` intersecting [start, end) in GFN order: each table's slice
    cut at its links into LEAVES cursors, each link's subtree walked in between (tdp_iter's
    pre-order at leaf granularity: what a zap traces, what a resumable listing needs).

    `pre_order`: a DOWN cursor before each subtree (what handle_removed_pt traces: a link
    frozen before its table's entries). `post_order`: an UP cursor after each subtree (what
    freeing needs). `leaf_tables`: a level-2 table's leaf tables wholly inside [start, end),
    with no huge leaf between them, come as one LEAF_TABLES cursor and are not descended
    into (the bulk path: a numpy pass over all of them).
    """
    level, base = pool.level(table), pool.gfn(table)
    lo, hi = clip(base, level, start, end)
    if lo >= hi:
        return
    if level == 1:
        yield Step.LEAVES, Cursor(table, level, base, lo, hi)
        return
    ent = pool.entries(table)
    prev = lo
    for a, b, grouped in _links(ent, Cursor(table, level, base, lo, hi), start, end, leaf_tables):
        if a > prev:
            yield Step.LEAVES, Cursor(table, level, base, prev, a)
        prev = b
        if grouped:
            yield Step.LEAF_TABLES, Cursor(table, level, base, a, b)
            continue
        if pre_order:
            yield Step.DOWN, Cursor(table, level, base, a, b)
        yield from walk_in_order(
            pool,
            pool.child(int(ent[a])),
            start,
            end,
            pre_order=pre_order,
            post_order=post_order,
            leaf_tables=leaf_tables,
        )
        if post_order:
            yield Step.UP, Cursor(table, level, base, a, b)
    if prev < hi:
        yield Step.LEAVES, Cursor(table, level, base, prev, hi)


def _links(
    ent: np.ndarray, cur: Cursor, start: int, end: int, leaf_tables: bool
) -> Iterator[tuple[int, int, bool]]:
    """The links among the cursor's entries `ent[lo:hi]` in GFN order: (a, b, grouped) where
    [a, b) holds one link (grouped False) or, with `leaf_tables` at level 2, several to leaf
    tables wholly inside [start, end) with no huge leaf between them (grouped True). Read
    before the caller unlinks any."""
    sl = ent[cur.lo : cur.hi]
    present = (sl & S.U_PRESENT) != 0
    huge = present & ((sl & S.U_PS) != 0)
    nonleaf = np.flatnonzero(present & ~huge)
    idx = cur.lo + nonleaf
    if not (leaf_tables and cur.level == 2) or len(nonleaf) < 2:
        return ((a, a + 1, False) for a in map(int, idx))  # lazily: a page may stop early
    sp = span(cur.level)
    full = (cur.base + idx * sp >= start) & (cur.base + (idx + 1) * sp <= end)
    # Links in one group: wholly inside and no huge leaf between them.
    key = np.where(full, np.cumsum(huge)[nonleaf], -1 - idx)
    cuts = np.flatnonzero(np.diff(key) != 0) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(idx)]))
    return zip(
        idx[starts].tolist(), (idx[ends - 1] + 1).tolist(), full[starts].tolist(), strict=True
    )
