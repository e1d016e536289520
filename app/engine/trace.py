"""The VM's trace ring: the kvmmmu tracepoints the TDP MMU would fire, newest N kept.

Records are rows of one numpy structured array written in the kernel's order (pre-order,
GFN ascending within a root, as tdp_iter visits them), a page-table page at a time, so the
ring costs a few vector operations per table, never a Python step per SPTE. `render` prints
them as `trace-cmd report` does (docs/trace.md): the text after the event name is each
tracepoint's TP_printk format (arch/x86/kvm/mmu/mmutrace.h).

The ring is diagnostic state: it is not journaled or snapshotted; a VM loaded again starts
with what its journal replay since the last snapshot recorded.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import spte as S
from .paging import ENTRIES, Step, TablePool, span, walk, walk_in_order

DEFAULT_RECORDS = 4096

Link = tuple[int, int, int, int]  # a table linked by a fault: gfn, level, old SPTE, new SPTE
Values = np.ndarray | np.uint64 | int | float  # one value per record, or one for all

RECORD = np.dtype(
    [
        ("seq", "<u8"),
        ("at", "<f8"),
        ("cpu", "<i4"),
        ("kind", "u1"),
        ("as_id", "u1"),
        ("level", "u1"),
        ("gfn", "<u8"),
        ("a", "<u8"),  # old SPTE / SPTE / pfn / used pages
        ("b", "<u8"),  # new SPTE / sptep
        ("c", "<i8"),  # errno / mmu_valid_gen
    ]
)


class Kind(enum.IntEnum):
    SPTE_CHANGED = 1  # kvm_tdp_mmu_spte_changed: as_id, gfn, level, a=old, b=new
    SPTE_REQUESTED = 2  # kvm_mmu_spte_requested: gfn, level, a=pfn
    SET_SPTE = 3  # kvm_mmu_set_spte: gfn, level, a=spte, b=sptep
    SPLIT_HUGE_PAGE = 4  # kvm_mmu_split_huge_page: gfn, level, a=spte, c=errno
    ZAP_ALL_FAST = 5  # kvm_mmu_zap_all_fast: c=mmu_valid_gen, a=used_pages


EVENT_NAMES = {
    Kind.SPTE_CHANGED: "kvm_tdp_mmu_spte_changed",
    Kind.SPTE_REQUESTED: "kvm_mmu_spte_requested",
    Kind.SET_SPTE: "kvm_mmu_set_spte",
    Kind.SPLIT_HUGE_PAGE: "kvm_mmu_split_huge_page",
    Kind.ZAP_ALL_FAST: "kvm_mmu_zap_all_fast",
}

NONPRESENT = np.uint64(S.SHADOW_NONPRESENT_VALUE)
FROZEN = np.uint64(S.FROZEN_SPTE)
_U = np.uint64
_PRESENT = _U(S.SPTE_MMU_PRESENT)
_PS = _U(S.EPT_PS)
_IDX = np.arange(ENTRIES, dtype=np.uint64)
_ALL = np.arange(ENTRIES)
_LEAF_KINDS = np.array([2, 1, 3], dtype=np.uint8)  # requested, changed, set_spte


def _huge_records(
    as_id: int,
    pos: int,
    level: int,
    table: int,
    i: int,
    old: np.ndarray,
    new: np.ndarray,
    head: list[Link],
) -> Fields:
    """The records of `TraceRing.huge_leaves_set`."""
    m = len(new)
    gfns = _U(pos) + np.arange(m, dtype=np.uint64) * _U(span(level))
    pfns = (new & S.U_ADDR) >> S.U_SHIFT
    ptr = np.asarray(sptep(table, np.arange(i, i + m, dtype=np.uint64)), dtype=np.uint64)
    # map_huge traces the request and the SET_SPTE without an address space (as_id 0).
    cols = {
        "kind": np.tile(_LEAF_KINDS, m),
        "as_id": np.tile(np.array([0, as_id, 0], dtype=np.uint8), m),
        "level": np.full(3 * m, level, dtype=np.uint8),
        "gfn": np.repeat(gfns, 3),
        "a": np.stack((pfns, old, new), axis=1).ravel(),
        "b": np.stack((np.zeros_like(new), new, ptr), axis=1).ravel(),
    }
    if head:
        lg, ll, la, lb = (np.array(col, dtype=np.uint64) for col in zip(*head, strict=True))
        links: dict[str, np.ndarray] = {
            "kind": np.full(len(head), int(Kind.SPTE_CHANGED), dtype=np.uint8),
            "as_id": np.full(len(head), as_id, dtype=np.uint8),
            "level": ll.astype(np.uint8),
            "gfn": lg,
            "a": la,
            "b": lb,
        }
        cols = {
            k: np.concatenate((v[:1], links[k].astype(v.dtype), v[1:])) for k, v in cols.items()
        }
    out: Fields = dict(cols)
    out["c"] = 0
    return out


def _table_records(
    as_id: int,
    tables: np.ndarray,
    base: int,
    first: int,
    pfn0: int,
    bits: int,
    before: np.ndarray | None,
    head: list[Link],
    links: tuple[np.ndarray, np.ndarray] | None,
    level: int = 1,
) -> Fields:
    """The records of `TraceRing.tables_set` (`level` 1) or `huge_tables_set` (`level` 2) for
    tables first, first+1, …: per table the first leaf's request, the table's link (`links`,
    one level up; `head` before table 0's), then the rest of its leaves' triples. Leaf k of
    table t maps GFN position base + (512 t + k) span(level) to pfn0 plus the same offset;
    `before` holds the entries it replaced (None: all non-present). `map_huge` traces the
    request and the SET_SPTE of a huge leaf without an address space (as_id 0)."""
    m = len(tables)
    k = np.arange(first, first + m, dtype=np.uint64)[:, None]
    offsets = (k * _U(ENTRIES) + _IDX) * _U(span(level))  # m x 512
    gfns = _U(base) + offsets
    pfns = _U(pfn0) + offsets
    leaves = _U(bits) | (pfns << S.U_SHIFT)
    pfn = _U(TablePool.pfn(0)) + tables.astype(np.uint64)[:, None]
    ptr = (pfn << S.U_SHIFT) + _IDX * _U(8)  # sptep of each entry
    old = np.broadcast_to(NONPRESENT, leaves.shape) if before is None else before
    triples = (m, 3 * ENTRIES)
    cols = {
        "kind": np.broadcast_to(np.tile(_LEAF_KINDS, ENTRIES), triples),
        "level": np.full(triples, level, dtype=np.uint8),
        "gfn": np.repeat(gfns, 3, axis=1),
        "a": np.stack((pfns, old, leaves), axis=2).reshape(m, -1),
        "b": np.stack((np.zeros_like(leaves), leaves, ptr), axis=2).reshape(m, -1),
    }
    link = {"kind": int(Kind.SPTE_CHANGED), "level": level + 1, "gfn": gfns[:, 0]}
    out: Fields = {"as_id": as_id, "c": 0}
    if level > 1:
        leaf_as_id = np.tile(np.array([0, as_id, 0], dtype=np.uint8), ENTRIES)
        cols["as_id"] = np.broadcast_to(leaf_as_id, triples)
        link["as_id"] = as_id
    if links is not None:
        link["a"], link["b"] = links
    above = [
        {"kind": int(Kind.SPTE_CHANGED), "as_id": as_id, "gfn": g, "level": lv, "a": o, "b": nw}
        for g, lv, o, nw in head
    ]
    for name, body in cols.items():
        if links is not None:
            col = np.broadcast_to(np.asarray(link[name], dtype=body.dtype), (m,))[:, None]
            body = np.concatenate((body[:, :1], col, body[:, 1:]), axis=1)
        flat = body.ravel()
        if above:
            vals = np.array([rec[name] for rec in above], dtype=flat.dtype)
            flat = np.concatenate((flat[:1], vals, flat[1:]))
        out[name] = flat
    return out


def _columns(size: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(size, dtype=RECORD[name]) for name in RECORD.names or ()}


def sptep(table: int, index: np.ndarray | int) -> np.ndarray | int:
    """The host physical address of an entry: its table's pfn, 8 bytes per entry."""
    return (TablePool.pfn(table) << S.PFN_SHIFT) + np.asarray(index, dtype=np.uint64) * _U(8)


Fields = dict[str, Values]


class TraceRing:
    """The newest `capacity` records (0: tracing off), one numpy column per field.

    Appends are lazy: a batch (a page-table page's records) is kept as a recipe and built only
    when read, and batches that newer ones already push out of the ring are dropped unbuilt,
    so a call that rewrites a million SPTEs builds only the last `capacity` records. Columns
    grow by doubling up to the capacity, so an idle VM holds almost nothing."""

    def __init__(self, capacity: int = DEFAULT_RECORDS) -> None:
        self.capacity = max(0, capacity)
        self._cols = _columns(min(self.capacity, 64))
        self.written = 0  # records ever appended; the newest one's seq
        self._n = 0  # records placed since the columns were laid out (ring position)
        # (count, recipe, at, cpu) of batches not built yet, oldest first.
        self._pending: deque[tuple[int, Callable[[], Fields], float, int]] = deque()
        self._pending_n = 0
        self._refill = False  # the pending batches alone fill the ring
        self.now = 0.0  # the running call's time (Vm.apply sets it)
        self.cpu = -1  # the vCPU the running work is on, -1: an ioctl on the VM

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def nbytes(self) -> int:
        built = len(self._cols["seq"]) * RECORD.itemsize  # one column per field, one length
        # Recipes never build more than the ring keeps.
        return built + min(self._pending_n, self.capacity) * RECORD.itemsize

    def resize(self, capacity: int) -> None:
        """Keep the newest min(len, capacity) records under a new capacity."""
        kept = self.records()[-capacity:] if capacity > 0 else self.records()[:0]
        self.capacity = max(0, capacity)
        self._cols = _columns(max(min(self.capacity, 64), len(kept)))
        for name, col in self._cols.items():
            col[: len(kept)] = kept[name]
        self._n = len(kept)

    # -- appending ----------------------------------------------------------------------------
    def append(
        self,
        kind: Kind,
        gfn: Values = 0,
        level: int = 0,
        a: Values = 0,
        b: Values = 0,
        c: int = 0,
        as_id: int = 0,
        n: int | None = None,
    ) -> None:
        """Append `n` records of one kind (array fields broadcast; scalars repeat). Arrays
        are kept as given: callers pass copies, never views of live page tables."""
        if not self.capacity:
            return
        if n is None:
            n = max(np.size(gfn), np.size(a), np.size(b))
        fields: Fields = {
            "kind": int(kind),
            "as_id": as_id,
            "level": level,
            "gfn": gfn,
            "a": a,
            "b": b,
            "c": c,
        }
        self._push(n, lambda: fields)

    def _push(self, n: int, recipe: Callable[[], Fields]) -> None:
        if n <= 0:
            return
        self._pending.append((n, recipe, self.now, self.cpu))
        self._pending_n += n
        self.written += n
        while self._pending_n - self._pending[0][0] >= self.capacity:
            dropped, *_ = self._pending.popleft()  # pushed out before anyone could read it
            self._pending_n -= dropped
            self._refill = True

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._refill:  # what was built before is all older than the ring keeps
            if len(self._cols["seq"]) < self.capacity:
                self._cols = _columns(self.capacity)
            self._n = 0
            self._refill = False
        seq = self.written - self._pending_n + 1
        for n, recipe, at, cpu in self._pending:
            self._store(n, seq, at, cpu, recipe())
            seq += n
        self._pending.clear()
        self._pending_n = 0

    def _store(self, n: int, seq: int, at: float, cpu: int, fields: Fields) -> None:
        cap = self.capacity
        if n > cap:  # only the newest `cap` survive, and nothing stored before
            # (a recipe may have built only the tail already)
            fields = {
                k: v[len(v) - cap :] if isinstance(v, np.ndarray) else v for k, v in fields.items()
            }
            if len(self._cols["seq"]) < cap:
                self._cols = _columns(cap)
            self._n = 0
            seq += n - cap
            n = cap
        filled = min(self._n, cap)
        size = len(self._cols["seq"])
        if filled < cap and filled + n > size:
            grown = _columns(min(cap, max(2 * size, filled + n)))
            for name, col in grown.items():
                col[:filled] = self._cols[name][:filled]
            self._cols = grown
        fields["seq"] = np.arange(seq, seq + n, dtype=np.uint64)
        fields["at"], fields["cpu"] = at, cpu
        pos = self._n % cap
        first = min(n, cap - pos)
        for name, v in fields.items():
            col = self._cols[name]
            if isinstance(v, np.ndarray) and v.ndim:
                col[pos : pos + first] = v[:first]
                col[: n - first] = v[first:]
            else:
                col[pos : pos + first] = v
                col[: n - first] = v
        self._n += n

    def records(self, after: int = 0) -> np.ndarray:
        """The records kept, oldest first, with seq > `after`."""
        self._flush()
        cap = self.capacity
        count = min(self._n, cap)
        out = np.empty(count, dtype=RECORD)
        if not count:
            return out
        pos = self._n % cap if self._n > cap else 0
        for name, col in self._cols.items():
            out[name][: count - pos] = col[pos:count]
            out[name][count - pos :] = col[:pos]
        return out[out["seq"] > after] if after else out

    # -- the tracepoints, a page-table page at a time ------------------------------------------
    def spte_changed(
        self,
        as_id: int,
        gfn: Values,
        level: int,
        old: Values,
        new: Values,
    ) -> None:
        self.append(Kind.SPTE_CHANGED, gfn, level, old, new, as_id=as_id)

    def leaves_set(
        self,
        as_id: int,
        table: int,
        index: np.ndarray,
        base_gfn: int,
        level: int,
        old: np.ndarray,
        new: np.ndarray,
        links: Sequence[Link] | None = None,
    ) -> None:
        """Faults installing leaves at `index` of one table, one fault per leaf: for each,
        kvm_mmu_spte_requested, kvm_tdp_mmu_spte_changed, kvm_mmu_set_spte (tdp_mmu.c
        kvm_tdp_mmu_map / tdp_mmu_map_handle_target_level). The tables the first fault
        linked (`links`: gfn, level, old, new) come right after its request."""
        if not self.capacity or not len(index):
            return
        idx = np.asarray(index, dtype=np.uint64)
        extra = list(links or ())

        def build() -> Fields:
            gfns = _U(base_gfn) + idx * _U(span(level))
            pfns = (new & S.U_ADDR) >> S.U_SHIFT
            kind = np.tile(_LEAF_KINDS, len(idx))
            lvl = np.full(len(kind), level, dtype=np.uint8)
            gfn = np.repeat(gfns, 3)
            a = np.stack((pfns, old, new), axis=1).ravel()
            b = np.stack((np.zeros_like(new), new, sptep(table, idx)), axis=1).ravel()
            if extra:  # request, links, then the rest
                lg, ll, la, lb = (
                    np.array(col, dtype=np.uint64) for col in zip(*extra, strict=True)
                )
                ins = np.full(len(extra), int(Kind.SPTE_CHANGED), dtype=np.uint8)
                kind = np.concatenate((kind[:1], ins, kind[1:]))
                lvl = np.concatenate((lvl[:1], ll.astype(np.uint8), lvl[1:]))
                gfn = np.concatenate((gfn[:1], lg, gfn[1:]))
                a = np.concatenate((a[:1], la, a[1:]))
                b = np.concatenate((b[:1], lb, b[1:]))
            return {"kind": kind, "as_id": as_id, "level": lvl, "gfn": gfn, "a": a, "b": b, "c": 0}

        self._push(3 * len(idx) + len(extra), build)

    def tables_set(
        self,
        as_id: int,
        tables: np.ndarray,
        base: int,
        pfn0: int,
        bits: int,
        before: np.ndarray | None,
        head: Sequence[Link],
        links: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """`leaves_set` for whole leaf tables in one batch: table k covers GFN positions
        base + 512k + [0, 512), its entries were `before[k]` (None: new tables, every entry
        non-present) and become `bits` | pfn (pfn0 + 512k + index). With `links` (old, new
        parent entries) each table was linked at level 2 by its first fault, table 0 after
        the `head` links above. The records are those one `leaves_set` per table writes,
        built only for the tail the ring keeps."""
        n = len(tables)
        if not self.capacity or not n:
            return
        per = 3 * ENTRIES + (1 if links is not None else 0)
        total = n * per + len(head)
        first = max(0, n - -(-self.capacity // per))  # the tables the ring can keep
        tabs = tables[first:].copy()
        old = None if before is None else before[first:].copy()
        kept = None if links is None else (links[0][first:].copy(), links[1][first:].copy())
        extra = list(head) if first == 0 else []

        def build() -> Fields:
            return _table_records(as_id, tabs, base, first, pfn0, bits, old, extra, kept)

        self._push(total, build)

    def huge_leaves_set(
        self,
        as_id: int,
        pos: int,
        level: int,
        table: int,
        i: int,
        old: np.ndarray,
        new: np.ndarray,
        head: Sequence[Link],
    ) -> None:
        """Faults installing huge leaves `new` at entries i, i+1, … of `table` (GFN positions
        from `pos`, aligned; `old` a copy of the entries), one fault per leaf:
        kvm_mmu_spte_requested, (the tables the first fault linked),
        kvm_tdp_mmu_spte_changed, kvm_mmu_set_spte, as `map_huge` traces them."""
        if self.capacity and len(new):
            links = list(head)
            self._push(
                3 * len(new) + len(links),
                lambda: _huge_records(as_id, pos, level, table, i, old, new, links),
            )

    def huge_tables_set(
        self,
        as_id: int,
        tables: np.ndarray,
        pos: int,
        pfn0: int,
        bits: int,
        head: Sequence[Link],
        links: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """`huge_leaves_set` for whole new level-2 tables of 2 MiB leaves in one batch: table
        k covers GFN positions pos + 2^18 k + [0, 2^18), was linked at level 3 by its first
        fault (`links`: old and new level-3 entries; table 0 after the `head` links above),
        and gets bits | pfn (pfn0 + 512 (512k + index)). Built only for the tail the ring
        keeps."""
        n = len(tables)
        if not self.capacity or not n:
            return
        per = 3 * ENTRIES + 1
        first = max(0, n - -(-self.capacity // per))  # the tables the ring can keep
        tabs = tables[first:].copy()
        kept = (links[0][first:].copy(), links[1][first:].copy())
        extra = list(head) if first == 0 else []

        def build() -> Fields:
            return _table_records(as_id, tabs, pos, first, pfn0, bits, None, extra, kept, level=2)

        self._push(n * per + len(head), build)

    def huge_splits(
        self, as_id: int, gfns: np.ndarray, level: int, old: np.ndarray, links: np.ndarray
    ) -> None:
        """Huge leaves `old` at GFN positions `gfns` split, one after the other: for each, the
        link that replaces it (kvm_tdp_mmu_spte_changed) then kvm_mmu_split_huge_page."""
        n = len(gfns)
        if not self.capacity or not n:
            return
        g, o, lk = gfns.copy(), old.copy(), links.copy()

        def build() -> Fields:
            kinds = np.array([Kind.SPTE_CHANGED, Kind.SPLIT_HUGE_PAGE], dtype=np.uint8)
            return {
                "kind": np.tile(kinds, n),
                "as_id": np.tile(np.array([as_id, 0], dtype=np.uint8), n),
                "level": level,
                "gfn": np.repeat(g, 2),
                "a": np.repeat(o, 2),
                "b": np.stack((lk, np.zeros_like(lk)), axis=1).ravel(),
                "c": 0,
            }

        self._push(2 * n, build)

    def leaves_zapped(
        self, as_id: int, bases: np.ndarray, old: np.ndarray, leaf: np.ndarray, per: np.ndarray
    ) -> None:
        """Leaf tables zapped at once: for each row k (GFN positions bases[k] + [0, 512)),
        its present leaves `leaf[k]` (entries `old[k]`) go non-present, the records one
        `spte_changed` per table writes (`per`: leaves per row); only the rows the ring can
        keep are copied."""
        total = int(per.sum())
        if not self.capacity or not total:
            return
        tail = np.cumsum(per[::-1])
        first = len(per) - 1 - int(np.searchsorted(tail, self.capacity))
        first = max(0, first)
        b, o, lf = bases[first:].copy(), old[first:].copy(), leaf[first:].copy()

        def build() -> Fields:
            gfns = (b.astype(np.uint64)[:, None] + _IDX)[lf]
            return {
                "kind": int(Kind.SPTE_CHANGED),
                "as_id": as_id,
                "level": 1,
                "gfn": gfns,
                "a": o[lf],
                "b": NONPRESENT,
                "c": 0,
            }

        self._push(total, build)

    def tables_recovered(
        self, as_id: int, bases: np.ndarray, links: np.ndarray, leaves: np.ndarray, old: np.ndarray
    ) -> None:
        """Leaf tables replaced by huge leaves under the read lock, one after the other: for
        row k, its link `links[k]` at level 2 (GFN position bases[k]) becomes `leaves[k]`,
        then every entry of the unlinked table (`old[k]`) is frozen: the records of one
        `spte_changed` and one shared `removed_table` per table. Only the tables the ring can
        keep are copied."""
        n = len(bases)
        if not self.capacity or not n:
            return
        per = ENTRIES + 1
        first = max(0, n - -(-self.capacity // per))  # the tables the ring can keep
        b = bases[first:].astype(np.uint64)
        lk, lf, o = links[first:].copy(), leaves[first:].copy(), old[first:].copy()

        def build() -> Fields:
            m = len(b)
            level = np.ones((m, per), dtype=np.uint8)
            level[:, 0] = 2
            gfn = np.concatenate((b[:, None], b[:, None] + _IDX), axis=1)
            frozen = np.broadcast_to(FROZEN, (m, ENTRIES))
            return {
                "kind": int(Kind.SPTE_CHANGED),
                "as_id": as_id,
                "level": level.ravel(),
                "gfn": gfn.ravel(),
                "a": np.concatenate((lk[:, None], o), axis=1).ravel(),
                "b": np.concatenate((lf[:, None], frozen), axis=1).ravel(),
                "c": 0,
            }

        self._push(n * per, build)

    def removed_table(self, pool: TablePool, table: int, as_id: int, shared: bool) -> None:
        """handle_removed_pt: every entry of an unlinked table goes to FROZEN_SPTE, a link's
        table right after the link (DOWN). Under the read lock (`shared`) every entry is
        traced, present or not; under the write lock only present ones."""
        if not self.capacity:
            return
        base = pool.gfn(table)
        end = base + ENTRIES * span(pool.level(table))
        for step, cur in walk_in_order(pool, table, base, end, pre_order=True):  # LEAVES, DOWN
            old = pool.entries(cur.table)[cur.lo : cur.hi].copy()  # the table is freed next
            idx = np.arange(cur.lo, cur.hi, dtype=np.uint64)
            if not shared and step is Step.LEAVES:  # present entries only (a link is present)
                keep = (old & _PRESENT) != 0
                idx, old = idx[keep], old[keep]
            if len(idx):
                gfns = _U(cur.base) + idx * _U(span(cur.level))
                self.spte_changed(as_id, gfns, cur.level, old, FROZEN)

    def root_teardown(self, pool: TablePool, root_table: int, as_id: int, shared: bool) -> None:
        """tdp_mmu_zap_root: a first pass zaps at the 1 GiB level (each present level-3 entry
        to SHADOW_NONPRESENT, its table removed), a second at the root's top level.

        One lazy batch per pass: the walk notes each table, a level-2 table's leaf tables as
        one group; only the tables whose records the ring can keep are copied (4 KiB each)
        and their records, in pre-order (GFN ascending, a parent entry before its table's),
        are built on read."""
        if not self.capacity:
            return
        for zap, cleared in ((3, 0), (pool.level(root_table), 3)):
            nodes = _collect(pool, root_table, zap, shared, cleared)
            nodes = _split_tail(pool, nodes, self.capacity)
            # Tables whose records the ring can never keep give their copies back now.
            kept = _pick(nodes, self.capacity)
            for k, node in enumerate(nodes):  # views until now: copy only what is kept
                node.ent = node.ent.copy() if k in kept else node.ent[:0]
            self._push(sum(node.count for node in nodes), self._expander(nodes, as_id))

    def _expander(self, nodes: list[_Node], as_id: int) -> Callable[[], Fields]:
        # The capacity, not the ring: a recipe the ring holds must not hold the ring (a cycle
        # would keep the ring, and the tables its nodes view, until the collector's oldest
        # generation runs). A resize flushes every recipe before the capacity changes.
        capacity = self.capacity
        return lambda: _expand(nodes, as_id, capacity)


@dataclass(slots=True)
class _Node:
    """One table of a root teardown and how its entries are traced, or (`rows` set) the leaf
    tables of one level-2 table, traced alike, until `_split_tail` picks some out."""

    level: int
    base: int
    ent: np.ndarray  # a copy (a view while collecting): the table is freed right after
    idx: np.ndarray  # the entries traced
    new: np.uint64  # what they become
    parent: int  # index of the parent node, -1 for none
    cleared: bool = False  # emptied by the first pass: every entry traced as non-present
    count: int = -1  # records; len(idx) unless a group
    rows: np.ndarray | None = None  # a group: its tables' rows, GFN bases, records per table
    bases: np.ndarray | None = None
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = len(self.idx)


def _collect(pool: TablePool, root: int, zap: int, shared: bool, cleared: int) -> list[_Node]:
    """The tables of one teardown pass in pre-order: above level `zap` only walked through;
    at `zap` its present entries go non-present and the tables they link are removed (entries
    frozen); those at or below `cleared` were emptied by the first pass (traced as all
    non-present, not descended); a level-2 table's leaf tables as one group."""
    out: list[_Node] = []
    node_at = [-1] * 6  # level -> the node of the table last met there: its children's parent
    for cur in walk(pool, root, 0, 1 << 62, min_level=max(2, cleared)):
        level, base = cur.level, cur.base
        if level > zap:
            continue
        parent = node_at[level + 1] if level < zap else -1
        ent = pool.entries(cur.table)
        if level <= cleared:
            if shared:  # handle_removed_pt freezes entries zapped by the first pass
                out.append(_Node(level, base, ent[:0], _ALL, FROZEN, parent, cleared=True))
            continue
        present = np.flatnonzero((ent & _PRESENT) != 0)
        if level < zap:  # removed
            idx, new = (_ALL if shared else present), FROZEN
        else:
            idx, new = present, NONPRESENT
        node_at[level] = len(out)
        out.append(_Node(level, base, ent, idx, new, parent))
        kids = present[(ent[present] & _PS) == 0] if level == 2 else present[:0]
        if len(kids):
            out.append(_leaf_group(pool, ent, kids, base, shared, node_at[level]))
    return out


def _leaf_group(
    pool: TablePool, ent: np.ndarray, kids: np.ndarray, base: int, shared: bool, parent: int
) -> _Node:
    """The removed leaf tables linked at entries `kids` of a level-2 table: every entry of
    each traced under the read lock, its present ones under the write lock."""
    rows = TablePool.children(ent[kids])
    if shared:
        counts = np.full(len(rows), ENTRIES, dtype=np.int64)
    else:
        counts = pool.present_counts(rows)
    bases = _U(base) + kids.astype(np.uint64) * _U(ENTRIES)
    n = int(counts.sum())
    return _Node(
        1, base, _ALL[:0], _ALL[:0], FROZEN, parent, count=n, rows=rows, bases=bases, counts=counts
    )


def _split_tail(pool: TablePool, nodes: list[_Node], keep: int) -> list[_Node]:
    """Groups the last `keep` records reach become one node per table for the tables the
    tail needs (the group keeps the rest, counted but never picked)."""
    total = 0
    for k in range(len(nodes) - 1, -1, -1):
        if total >= keep:
            break
        node = nodes[k]
        if node.rows is None or node.counts is None or node.bases is None:
            total += node.count
            continue
        tail = np.cumsum(node.counts[::-1])
        m = min(int(np.searchsorted(tail, keep - total)) + 1, len(node.counts))
        split = len(node.counts) - m
        singles = []
        for row, b, c in zip(
            node.rows[split:].tolist(),
            node.bases[split:].tolist(),
            node.counts[split:].tolist(),
            strict=True,
        ):
            ent = pool.entries(row)
            idx = _ALL if c == ENTRIES else np.flatnonzero((ent & _PRESENT) != 0)
            singles.append(_Node(1, b, ent, idx, FROZEN, node.parent))
        rest = node.counts[:split]
        group = (
            []
            if not split
            else [
                _Node(
                    1,
                    node.base,
                    _ALL[:0],
                    _ALL[:0],
                    FROZEN,
                    node.parent,
                    count=int(rest.sum()),
                    rows=node.rows[:split],
                    bases=node.bases[:split],
                    counts=rest,
                )
            ]
        )
        nodes[k : k + 1] = group + singles
        total += int(tail[m - 1])
    return nodes


def _pick(nodes: list[_Node], keep: int) -> set[int]:
    """The nodes whose records can be among the last `keep`: the shortest suffix holding
    that many, and their ancestors (whose later entries interleave with them)."""
    pick: set[int] = set()
    total = 0
    for k in range(len(nodes) - 1, -1, -1):
        if total >= keep:
            break
        pick.add(k)
        total += nodes[k].count
    for k in list(pick):
        p = nodes[k].parent
        while p >= 0 and p not in pick:
            pick.add(p)
            p = nodes[p].parent
    return pick


def _expand(nodes: list[_Node], as_id: int, keep: int) -> Fields:
    """The records of one teardown pass, the last `keep` of them: the shortest suffix of
    tables (in pre-order) holding that many, with their ancestors, sorted into pre-order."""
    gfn, level, old, new = [], [], [], []
    for k in sorted(_pick(nodes, keep)):
        node = nodes[k]
        gfn.append(_U(node.base) + node.idx.astype(np.uint64) * _U(span(node.level)))
        level.append(np.full(node.count, node.level, dtype=np.uint8))
        old.append(np.full(node.count, NONPRESENT) if node.cleared else node.ent[node.idx])
        new.append(np.full(node.count, node.new))
    g, lv = np.concatenate(gfn), np.concatenate(level)
    order = np.lexsort((-lv.astype(np.int16), g))[-keep:]
    return {
        "kind": int(Kind.SPTE_CHANGED),
        "as_id": as_id,
        "level": lv[order],
        "gfn": g[order],
        "a": np.concatenate(old)[order],
        "b": np.concatenate(new)[order],
        "c": 0,
    }


# -- rendering -----------------------------------------------------------------------------------
def _info(r: np.void) -> str:
    kind = Kind(int(r["kind"]))
    gfn, level, a, b, c = int(r["gfn"]), int(r["level"]), int(r["a"]), int(r["b"]), int(r["c"])
    if kind is Kind.SPTE_CHANGED:
        return f"as id {int(r['as_id'])} gfn {gfn:x} level {level} old_spte {a:x} new_spte {b:x}"
    if kind is Kind.SPTE_REQUESTED:
        return f"gfn {gfn:x} pfn {a:x} level {level}"
    if kind is Kind.SET_SPTE:
        perms = ("r" if a & S.EPT_R else "-") + ("w" if a & S.EPT_W else "-")
        perms += "x" if a & S.EPT_X else "-"  # EPT has no user bit: the fourth flag is empty
        return f"gfn {gfn:x} spte {a:x} ({perms}) level {level} at {b:x}"
    if kind is Kind.SPLIT_HUGE_PAGE:
        return f"gfn {gfn:x} spte {a:x} level {level} errno {c}"
    return f"kvm-mmu-valid-gen {c} used_pages {a:x}"


def render(records: np.ndarray, comm: str = "vmm", pid: int = 1) -> Iterator[str]:
    """Lines as `trace-cmd report` prints them: comm-pid, [cpu], seconds.micros, event, info.
    vCPU work is on "CPU n/KVM" (QEMU's vCPU thread name), CPU n; ioctls on the VMM thread."""
    for r in records:
        cpu = int(r["cpu"])
        who = f"CPU {cpu}/KVM-{pid + 1 + cpu}" if cpu >= 0 else f"{comm}-{pid}"
        ts = float(r["at"])
        name = EVENT_NAMES[Kind(int(r["kind"]))]
        yield f"{who:>22} [{max(cpu, 0):03d}] {ts:.6f}: {name + ':':<26} {_info(r)}"


def to_json(r: np.void) -> dict[str, object]:
    """One record as data (the trace's `format=json`)."""
    kind = Kind(int(r["kind"]))
    return {
        "seq": int(r["seq"]),
        "at": float(r["at"]),
        "cpu": int(r["cpu"]) if int(r["cpu"]) >= 0 else None,
        "event": EVENT_NAMES[kind],
        "text": _info(r),
    }
