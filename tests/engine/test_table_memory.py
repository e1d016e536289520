"""Page-table memory goes back as soon as a VM is dropped, and the next VM reuses it.

A reference cycle through a VM would keep its tables (gigabytes for a big guest) until the
collector's oldest generation runs, long after the budget released them; the spare chunks
of a dropped pool let the next pool grow without a page fault per 4 KiB.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from app.engine import Vm, codec
from app.engine import paging as P
from app.engine.ops import parse

from .mmu import GB, HVA, access, region
from .test_journal_compat import FIXTURE, replay


@pytest.fixture
def spare(monkeypatch: pytest.MonkeyPatch) -> P.SpareChunks:
    """A spare list of this test's own (the process-wide one holds other tests' chunks)."""
    fresh = P.SpareChunks(limit=P.SPARE.limit)
    monkeypatch.setattr(P, "SPARE", fresh)
    return fresh


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def mapped(size: int = GB) -> Vm:
    """Slot 0 over [0, size), faulted in at 4 KiB: size / 2 MiB leaf tables."""
    vm = Vm.create(0, 1)
    region(vm, 0, 0, size, HVA)
    access(vm, 0, size, "write")
    return vm


def entry_chunks(vm: Vm) -> list[np.ndarray]:
    return list(vm.mmu.pool._entries)


@pytest.mark.parametrize("case", FIXTURE["vms"], ids=lambda c: c["name"])
@pytest.mark.parametrize("loaded", [False, True], ids=["replayed", "loaded"])
@pytest.mark.usefixtures("no_collector")
def test_a_dropped_vm_and_its_tables_go_without_the_collector(
    case: dict[str, Any], loaded: bool
) -> None:
    vm = replay(case["create"], case["records"])
    if loaded:
        vm = codec.loads(codec.dumps(vm))
    refs = [weakref.ref(vm), weakref.ref(vm.mmu.pool), weakref.ref(vm.mmu.trace)]
    del vm
    assert [r() for r in refs] == [None, None, None]


@pytest.mark.usefixtures("no_collector")
def test_a_teardown_traced_in_the_ring_does_not_outlive_the_vm(spare: P.SpareChunks) -> None:
    vm = mapped()
    zap = vm.apply(parse("set_user_memory_region", {"slot": 0, "memory_size": 0}))
    assert zap["zap"]["sptes_zapped_total"] == GB // 4096
    assert len(vm.mmu.trace.records()) > 0
    chunks = len(entry_chunks(vm))
    del vm
    assert len(spare) == chunks


def small(size: int = 4096) -> Vm:
    vm = Vm.create(0, 1)
    region(vm, 0, 0, size, HVA)
    access(vm, 0, size, "write")  # a handful of tables: the rest of the chunk is untouched
    return vm


def test_the_next_pool_grows_into_a_dropped_pools_chunks_as_they_are(
    spare: P.SpareChunks,
) -> None:
    first = mapped()  # built from chunks nobody used before, kept to the end
    fresh = small()
    vm = mapped()
    before = {id(c) for c in entry_chunks(vm)}
    del vm
    gc.collect()
    assert len(spare) == len(before)
    vm = small()
    (chunk,) = entry_chunks(vm)
    assert id(chunk) in before
    # What the last VM wrote past this pool's top is still there (not zeroed), and unread:
    # the VM is the one built in fresh memory.
    assert chunk[vm.mmu.pool.top :].any()
    assert codec.digest(vm) == codec.digest(fresh)
    tables, fresh_tables = vm.mmu.pool.export(), fresh.mmu.pool.export()
    assert tables.keys() == fresh_tables.keys()
    assert all(np.array_equal(tables[k], fresh_tables[k]) for k in tables)
    assert vm.audit()["ok"]
    del vm, chunk
    again = mapped()  # a VM built in reused chunks is the same VM
    assert {id(c) for c in entry_chunks(again)} == before
    assert codec.digest(again) == codec.digest(first)
    assert again.audit()["ok"]


def test_full_chunks_are_taken_before_a_partial_one(spare: P.SpareChunks) -> None:
    vm = mapped(3 * GB)  # 1,536 leaf tables: a full chunk, then a partial one
    full, partial = (id(c) for c in entry_chunks(vm))
    del vm
    gc.collect()
    vm = small()
    assert [id(c) for c in entry_chunks(vm)] == [full]
    assert [id(c) for c in spare._chunks] == [partial]


def test_a_chunk_still_viewed_is_not_reused(spare: P.SpareChunks) -> None:
    vm = mapped()
    held = vm.mmu.pool.entries(0)  # a view of the first chunk, as a reader might keep
    seen = held.copy()
    chunks = {id(c) for c in entry_chunks(vm)}
    del vm
    gc.collect()
    again = mapped()
    assert np.array_equal(held, seen)  # never zeroed or rewritten under the reader
    reused = {id(c) for c in entry_chunks(again)} & chunks
    assert len(reused) == len(chunks) - 1


def test_the_spare_list_is_bounded(spare: P.SpareChunks) -> None:
    spare.limit = 2
    vms = [mapped(3 * GB) for _ in range(2)]  # 1,536 leaf tables: two chunks each
    assert all(len(entry_chunks(vm)) == 2 for vm in vms)
    del vms
    gc.collect()
    assert len(spare) == 2


def test_a_lowered_limit_keeps_nothing_more(spare: P.SpareChunks) -> None:
    vms = [mapped(3 * GB) for _ in range(2)]  # two chunks each
    del vms
    gc.collect()
    assert len(spare) == 4
    spare.limit = 1  # below what is kept: a dropped pool's chunks add none
    spare.keep([np.zeros((P.CHUNK, P.ENTRIES), np.uint64) for _ in range(5)])
    assert len(spare) == 4


def test_a_capture_copies_into_spare_chunks_and_gives_them_back(spare: P.SpareChunks) -> None:
    vm = mapped(3 * GB)  # one full chunk of entries, one partial
    full = 1
    copy = codec.capture(vm)
    assert len(spare) == 0
    assert codec.encode(copy) == codec.dumps(vm)
    del copy
    assert len(spare) == full
    again = codec.capture(vm)  # takes it back: every entry is copied over
    assert len(spare) == 0
    assert codec.encode(again) == codec.dumps(vm)
