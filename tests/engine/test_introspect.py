"""Run-length mappings: maximal runs in GFN order, resumable from any run's end, lazy."""

from __future__ import annotations

from itertools import islice

from app.engine import Vm
from app.engine.paging import TablePool

from .mmu import DEFAULT, HVA, M2, MB, access, hugepage, pages, region


def _runs_vm() -> Vm:
    """4 KiB leaves under a 2 MiB one in the same level-2 table (GPA 0-2 MiB at 4 KiB,
    2-4 MiB huge), then 2 MiB slots whose HVAs leave gaps (one run each)."""
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    hugepage(vm, HVA + M2, M2)
    access(vm, 0, 4 * MB)
    for i in range(1, 9):
        region(vm, i, i * 4 * MB, M2, HVA + i * 8 * MB)
        access(vm, i * 4 * MB, M2)
    return vm


def _end(run: dict) -> int:
    return int(run["position"] + run["npages"])


def test_runs_are_maximal_and_in_gfn_order() -> None:
    vm = _runs_vm()
    runs = vm.mappings()
    # The child table's 4 KiB leaves come before the huge leaf that follows them.
    assert [(r["level"], r["position"], r["npages"]) for r in runs[:2]] == [
        (1, 0, 512),
        (2, 512, 512),
    ]
    assert len(runs) == 10
    for a, b in zip(runs, runs[1:], strict=False):
        assert (a["root"], _end(a)) <= (b["root"], b["position"])
        assert not (
            a["level"] == b["level"]
            and _end(a) == b["position"]
            and a["pfn"] + a["npages"] == b["pfn"]
            and (a["r"], a["w"], a["x"]) == (b["r"], b["w"], b["x"])
        ), "two runs that continue each other"
    k4, m2, g1 = pages(vm)
    assert sum(r["npages"] for r in runs) == k4 + 512 * m2 + 512 * 512 * g1


def test_iteration_resumes_at_any_run_end() -> None:
    vm = _runs_vm()
    runs = vm.mappings()
    for i, run in enumerate(runs):
        assert list(vm.iter_mappings(start=(run["root"], _end(run)))) == runs[i + 1 :]
    assert list(vm.iter_mappings(start=(runs[0]["root"] + 1, 0))) == []
    # From inside a run of 4 KiB leaves: the leaves at and after the position.
    rest = list(vm.iter_mappings(start=(runs[0]["root"], 1)))
    assert (rest[0]["position"], rest[0]["npages"], rest[1:]) == (1, 511, runs[1:])


def test_a_short_page_walks_only_the_tables_it_covers(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    vm = _runs_vm()
    pool = vm.mmu.pool
    seen: list[int] = []
    real = TablePool.entries

    def counted(idx: int):  # type: ignore[no-untyped-def]
        seen.append(idx)
        return real(pool, idx)

    monkeypatch.setattr(pool, "entries", counted)
    assert len(list(islice(vm.iter_mappings(), 2))) == 2
    first = len(set(seen))
    seen.clear()
    vm.mappings()
    # Root, levels 3 and 2, the first leaf table and the next one (where the second run
    # ends): not the other seven slots' tables, which the whole list walks.
    assert first == 5 and len(set(seen)) == 12
