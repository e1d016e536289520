"""The page-table pool, the one walk (app/engine/paging.py) and roots (app/engine/roots.py),
tested directly rather than through faults."""

from __future__ import annotations

import numpy as np

from app.engine import spte as S
from app.engine.paging import CHUNK, ENTRIES, TablePool, clip, span, walk
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
