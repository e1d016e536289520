"""The page-table pool, the one walk (app/engine/paging.py) and roots (app/engine/roots.py),
tested directly rather than through faults."""

from __future__ import annotations

import numpy as np

from app.engine import spte as S
from app.engine.paging import CHUNK, ENTRIES, Step, TablePool, clip, span, walk, walk_in_order
from app.engine.roots import Mmu, RootRole, ZapAcc, index_runs

LEAF = S.leaf_bits(level=1, writable=True, host_writable=True, exec_=True, ipat=True, accessed=True)


def test_rows_are_reused_after_release_and_counted_live() -> None:
    pool = TablePool()
    a, b = pool.alloc(1, 0, 1), pool.alloc(2, 0, 1)
    assert pool.live == 2 and (pool.level(a), pool.level(b)) == (1, 2)
    assert (pool.entries(a) == np.uint64(S.NONPRESENT)).all()
    pool.release(a)
    assert pool.live == 1 and not pool.is_live(a)
    assert pool.alloc(1, 512, 2) == a and pool.gfn(a) == 512 and pool.root(a) == 2


def test_clip_and_span() -> None:
    assert [span(lv) for lv in (1, 2, 3, 4)] == [1, 512, 512**2, 512**3]
    assert clip(0, 1, 10, 20) == (10, 20)
    assert clip(0, 2, 511, 513) == (0, 2)  # entries covering GFNs 0-511 and 512-1023
    assert clip(1024, 1, 0, 10_000) == (0, ENTRIES)


def tree() -> tuple[Mmu, int]:
    """A 4-level root with 4K leaves at GFNs 0..3 and 1024..1025."""
    mmu = Mmu(4)
    root = mmu.get_root(0, RootRole.DIRECT)
    for pos in (0, 1024):
        t = mmu.table_for(root, pos, 1, ZapAcc())
        n = 4 if pos == 0 else 2
        vals = np.array([LEAF | ((0x100 + pos + i) << S.PFN_SHIFT) for i in range(n)], np.uint64)
        mmu.set_leaves(root, t, pos & 511, vals, 1)
    return mmu, root.id


def test_walk_visits_every_table_intersecting_the_range_once() -> None:
    mmu, rid = tree()
    root = mmu.roots[rid]
    levels = [c.level for c in walk(mmu.pool, root.table, 0, 1 << 30)]
    assert levels == [4, 3, 2, 1, 1]  # one path down, two leaf tables
    post = [c.level for c in walk(mmu.pool, root.table, 0, 1 << 30, post_order=True)]
    assert post == [1, 1, 2, 3, 4]
    only_second = [(c.level, c.base, c.lo, c.hi) for c in walk(mmu.pool, root.table, 1024, 1026)]
    assert only_second[-1] == (1, 1024, 0, 2)


HUGE = {
    lv: S.leaf_bits(
        level=lv, writable=True, host_writable=True, exec_=True, ipat=True, accessed=True
    )
    for lv in (2, 3)
}
T2 = 512  # GFNs under one level-2 entry


def mixed() -> tuple[Mmu, int, int]:
    """A 4-level root whose first level-2 table holds, by entry: 0 a leaf table (4K leaves
    at GFNs 0..3), 1 a 2M leaf, 2 and 3 full leaf tables, 4 a 2M leaf, 5 a full leaf table;
    and a 1G leaf at level-3 entry 1. Returns (mmu, root id, the level-2 table)."""
    mmu = Mmu(4)
    root = mmu.get_root(0, RootRole.DIRECT)
    for i in (0, 2, 3, 5):
        t = mmu.table_for(root, i * T2, 1, ZapAcc())
        n = 4 if i == 0 else ENTRIES
        pfns = np.arange(n, dtype=np.uint64) + np.uint64(0x1000 + i * T2)
        mmu.set_leaves(root, t, 0, (pfns << np.uint64(S.PFN_SHIFT)) | np.uint64(LEAF), 1)
    l2 = mmu.table_for(root, 0, 2, ZapAcc())
    for i in (1, 4):
        mmu.set_leaves(root, l2, i, np.array([HUGE[2] | ((0x9000 + i) << 21)], np.uint64), 2)
    l3 = mmu.table_for(root, 0, 3, ZapAcc())
    mmu.set_leaves(root, l3, 1, np.array([HUGE[3] | (1 << 30)], np.uint64), 3)
    return mmu, root.id, l2


def steps(mmu: Mmu, rid: int, start: int, end: int, **kw: bool) -> list[tuple[str, int, int, int]]:
    table = mmu.roots[rid].table
    return [
        (st.value, c.level, c.gfn(c.lo), c.gfn(c.hi))
        for st, c in walk_in_order(mmu.pool, table, start, end, **kw)
    ]


def test_walk_in_order_cuts_each_table_at_its_links_in_gfn_order() -> None:
    """A table's entries come as LEAVES slices between its links, each link's subtree in
    between: the leaves in GFN order whatever their level."""
    mmu, rid, _ = mixed()
    got = steps(mmu, rid, 0, 1 << 40)
    leaf_tables = [("leaves", 1, i * T2, (i + 1) * T2) for i in (0, 2, 3)]
    assert (
        got
        == [
            *leaf_tables[:1],
            ("leaves", 2, 1 * T2, 2 * T2),  # the 2M leaf between leaf tables 0 and 2
            *leaf_tables[1:],
            ("leaves", 2, 4 * T2, 5 * T2),
            ("leaves", 1, 5 * T2, 6 * T2),
            ("leaves", 2, 6 * T2, ENTRIES * T2),  # the rest of the level-2 table: non-present
            ("leaves", 3, ENTRIES * T2, ENTRIES * ENTRIES * T2),  # the 1G leaf and beyond
            ("leaves", 4, ENTRIES**3, ENTRIES**4),
        ]
    )
    for st, c in walk_in_order(mmu.pool, mmu.roots[rid].table, 0, 1 << 40):
        sl = mmu.pool.entries(c.table)[c.lo : c.hi]
        links = (sl & S.U_PRESENT != 0) & (sl & S.U_PS == 0) if c.level > 1 else sl < 0
        assert st is Step.LEAVES and not links.any()  # every present entry a leaf


def test_walk_in_order_resumes_from_a_position() -> None:
    """Clipped to [start, end) as `walk` is: the slice holding `start` comes first."""
    mmu, rid, _ = mixed()
    assert steps(mmu, rid, 2 * T2 + 7, 4 * T2 + 1) == [
        ("leaves", 1, 2 * T2 + 7, 3 * T2),
        ("leaves", 1, 3 * T2, 4 * T2),
        ("leaves", 2, 4 * T2, 5 * T2),  # the 2M leaf over the end
    ]
    assert steps(mmu, rid, 1 << 40, 1 << 41) == []


def test_walk_in_order_post_order_and_leaf_tables() -> None:
    """UP names the link after its subtree; with `leaf_tables` the leaf tables wholly
    inside, with no huge leaf between them, come as one slice and are not descended."""
    mmu, rid, _ = mixed()
    got = steps(mmu, rid, 3, 6 * T2 - 1, post_order=True, leaf_tables=True)
    assert got == [
        ("leaves", 1, 3, T2),  # leaf table 0: partly inside, descended
        ("up", 2, 0, T2),
        ("leaves", 2, T2, 2 * T2),
        ("leaf_tables", 2, 2 * T2, 4 * T2),  # tables 2 and 3 at once
        ("leaves", 2, 4 * T2, 5 * T2),
        ("leaves", 1, 5 * T2, 6 * T2 - 1),  # table 5: partly inside
        ("up", 2, 5 * T2, 6 * T2),
        ("up", 3, 0, ENTRIES * T2),
        ("up", 4, 0, ENTRIES**3),
    ]
    alone = steps(mmu, rid, 0, 1 << 40, leaf_tables=True)  # a huge leaf cuts the group
    assert [s for s in alone if s[0] == "leaf_tables"] == [
        ("leaf_tables", 2, 0, T2),
        ("leaf_tables", 2, 2 * T2, 4 * T2),
        ("leaf_tables", 2, 5 * T2, 6 * T2),
    ]


def test_walk_in_order_pre_order_names_each_link_before_its_subtree() -> None:
    """DOWN names the link [lo, lo + 1) before its subtree, UP after it: the huge leaves
    between tables stay LEAVES slices of their own, in GFN order (handle_removed_pt's
    order: a link frozen, then its table's entries)."""
    mmu, rid, _ = mixed()
    got = steps(mmu, rid, 0, 1 << 40, pre_order=True, post_order=True)
    assert got == [
        ("down", 4, 0, ENTRIES**3),
        ("down", 3, 0, ENTRIES * T2),
        ("down", 2, 0, T2),
        ("leaves", 1, 0, T2),
        ("up", 2, 0, T2),
        ("leaves", 2, T2, 2 * T2),  # the 2M leaf between leaf tables 0 and 2
        ("down", 2, 2 * T2, 3 * T2),
        ("leaves", 1, 2 * T2, 3 * T2),
        ("up", 2, 2 * T2, 3 * T2),
        ("down", 2, 3 * T2, 4 * T2),
        ("leaves", 1, 3 * T2, 4 * T2),
        ("up", 2, 3 * T2, 4 * T2),
        ("leaves", 2, 4 * T2, 5 * T2),
        ("down", 2, 5 * T2, 6 * T2),
        ("leaves", 1, 5 * T2, 6 * T2),
        ("up", 2, 5 * T2, 6 * T2),
        ("leaves", 2, 6 * T2, ENTRIES * T2),
        ("up", 3, 0, ENTRIES * T2),
        ("leaves", 3, ENTRIES * T2, ENTRIES * ENTRIES * T2),  # the 1G leaf and beyond
        ("up", 4, 0, ENTRIES**3),
        ("leaves", 4, ENTRIES**3, ENTRIES**4),
    ]
    # Opt-in: without it the same walk has no DOWN, and DOWN alone is the pre-order half.
    assert [s for s in got if s[0] != "down"] == steps(mmu, rid, 0, 1 << 40, post_order=True)
    assert [s for s in got if s[0] != "up"] == steps(mmu, rid, 0, 1 << 40, pre_order=True)
    # Grouped leaf tables are not descended: no DOWN for them; a table cut by the range is.
    grouped = steps(mmu, rid, 3, 6 * T2 - 1, pre_order=True, leaf_tables=True)
    assert grouped == [
        ("down", 4, 0, ENTRIES**3),
        ("down", 3, 0, ENTRIES * T2),
        ("down", 2, 0, T2),
        ("leaves", 1, 3, T2),
        ("leaves", 2, T2, 2 * T2),
        ("leaf_tables", 2, 2 * T2, 4 * T2),
        ("leaves", 2, 4 * T2, 5 * T2),
        ("down", 2, 5 * T2, 6 * T2),
        ("leaves", 1, 5 * T2, 6 * T2 - 1),
    ]
    for st, c in walk_in_order(mmu.pool, mmu.roots[rid].table, 0, 1 << 40, pre_order=True):
        if st is Step.DOWN:  # the cursor holds exactly one present non-leaf entry
            e = mmu.pool.entries(c.table)[c.lo : c.hi]
            assert c.hi == c.lo + 1 and e[0] & S.U_PRESENT and not e[0] & S.U_PS


def test_zap_in_gfn_order_records_runs_and_frees_tables_inside() -> None:
    """The zap loops over `walk_in_order`: runs in GFN order (a 2M leaf between leaf
    tables), tables wholly inside freed and unlinked, the bulk path alike."""
    for bulk in (True, False):
        mmu, rid, l2 = mixed()
        mmu.bulk = bulk
        root = mmu.roots[rid]
        acc, live = ZapAcc(), mmu.pool.live
        mmu.zap_range(root, 2, 5 * T2 + 3, acc, leafs_only=False)
        assert [(s, e) for s, e, _ in acc.runs] == [
            (2, 4),
            (T2, 2 * T2),
            (2 * T2, 3 * T2),
            (3 * T2, 4 * T2),
            (4 * T2, 5 * T2),
            (5 * T2, 5 * T2 + 3),
        ]
        assert acc.tables_freed == 2 and mmu.pool.live == live - 2  # tables 2 and 3
        ent = mmu.pool.entries(l2)
        assert [bool(ent[i] & S.U_PRESENT) for i in range(6)] == [True] + [False] * 4 + [True]


def test_lookup_leaf_iter_and_counts() -> None:
    mmu, rid = tree()
    root = mmu.roots[rid]
    table, i, level, e = mmu.lookup(root, 1025)
    assert (level, i) == (1, 1) and S.pfn_of(e) == 0x100 + 1025
    assert mmu.lookup(root, 5)[3] == S.NONPRESENT
    found = [(c.base + int(j)) for c, _sl, idx in mmu.leaf_iter(root) for j in idx]
    assert found == [0, 1, 2, 3, 1024, 1025]
    assert root.leaves[1] == 6 and mmu.pages[1] == 6


def test_zap_range_counts_flushes_and_frees_empty_tables() -> None:
    mmu, rid = tree()
    root = mmu.roots[rid]
    acc = ZapAcc()
    mmu.zap_range(root, 1, 1025, acc, leafs_only=True)
    assert acc.total() == 4 and acc.flush  # GFNs 1, 2, 3 and 1024
    assert [(s, e) for s, e, _ in acc.runs] == [(1, 4), (1024, 1025)]
    assert root.leaves[1] == 2
    live = mmu.pool.live
    mmu.free_root(root, ZapAcc())
    assert rid not in mmu.roots and mmu.pool.live == live - 5


def test_an_invalid_root_zap_needs_no_flush() -> None:
    mmu, rid = tree()
    root = mmu.roots[rid]
    root.valid = False
    acc = ZapAcc()
    mmu.zap_range(root, 0, 1 << 30, acc, leafs_only=True)
    assert acc.total() == 6 and not acc.flush


def test_get_root_reuses_the_valid_root_of_a_role() -> None:
    mmu = Mmu(4)
    a = mmu.get_root(0, RootRole.DIRECT)
    assert mmu.get_root(0, RootRole.DIRECT) is a
    assert mmu.get_root(1, RootRole.DIRECT) is not a
    a.valid = False
    assert mmu.get_root(0, RootRole.DIRECT) is not a


def test_index_runs() -> None:
    assert index_runs(np.array([], np.int64)) == []
    assert index_runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]


def test_pool_chunks_round_trip() -> None:
    pool = TablePool()
    rows = [pool.alloc(1 + i % 3, i * 512, 7) for i in range(CHUNK + 5)]
    for r in rows[::3]:
        pool.entries(r)[:] = np.arange(ENTRIES, dtype=np.uint64) + np.uint64(r)
    for r in rows[1::7]:
        pool.release(r)
    back = TablePool.restore_chunks(pool.top, pool.free_rows, pool.export_chunks())
    assert back.live == pool.live and back.free_rows == pool.free_rows
    for r in rows:
        assert back.is_live(r) == pool.is_live(r)
        if pool.is_live(r):
            assert (back.entries(r) == pool.entries(r)).all()
            assert (back.level(r), back.gfn(r), back.root(r)) == (pool.level(r), pool.gfn(r), 7)


def test_rows_allocated_in_bulk_are_alloc_s_rows_and_get_their_own_leaves() -> None:
    """`alloc_rows` takes free rows last-freed first, as `alloc` does, and `write_leaf_rows`
    writes row k's leaves into row k even when the rows are a shuffled run."""
    pool = TablePool()
    for _ in range(8):
        pool.alloc(1, 0, 1)
    for row in (5, 3, 4, 2):
        pool.release(row)
    gfns = np.arange(4, dtype=np.uint64) * np.uint64(512)
    rows = pool.alloc_rows(1, gfns, 1)
    assert rows.tolist() == [2, 4, 3, 5]
    before = {r: pool.entries(r).copy() for r in (0, 1, 6, 7)}
    pool.write_leaf_rows(rows, 1000, 7)
    for k, row in enumerate(rows.tolist()):
        want = (np.uint64(1000 + 512 * k) + np.arange(512, dtype=np.uint64)) << np.uint64(12)
        assert np.array_equal(pool.entries(row), want | np.uint64(7))
        assert pool.gfn(row) == 512 * k and pool.level(row) == 1
    for r, ent in before.items():
        assert np.array_equal(pool.entries(r), ent)
