"""`GET …/mappings` on a VM with 1M runs (prints figures, asserts nothing about time).

A 4 GiB slot faulted in at 4 KiB (1,048,576 leaves), then the W bit cleared on every other
leaf (what dirty logging's write-protection does to a page; done here with numpy for speed):
every leaf is a run of its own. Printed: time and Python-allocated peak (tracemalloc, numpy
included) of the first page (`limit=1`, what the route asks the engine for: two runs) and
of a page from a cursor deep in the VM, against listing every run.

Usage: python bench/mappings.py [--gib N]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np

from app.engine import Vm
from app.engine import spte as S
from app.engine.ops import parse

HVA = 0x7F00_0000_0000
GIB = 1 << 30


def _vm(size: int) -> Vm:
    vm = Vm.create(0, 1, table_budget=1 << 22)
    region = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": size}
    vm.apply(parse("set_user_memory_region", {**region, "userspace_addr": HVA}))
    vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"}))
    pool = vm.mmu.pool
    for idx in range(pool.top):
        if pool.is_live(idx) and pool.level(idx) == 1:
            pool.entries(idx)[1::2] &= ~np.uint64(S.EPT_W)
    return vm


def _measure(label: str, fn: Callable[[], Any]) -> Any:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{label:<44} {dt * 1e3:10.2f} ms  peak {peak / 2**20:9.2f} MiB")
    return out


def main(gib: int) -> None:
    vm = _vm(gib * GIB)
    pages = gib * GIB // 4096
    first = _measure("limit=1 (two runs walked)", lambda: list(islice(vm.iter_mappings(), 2)))
    assert first[0]["npages"] == 1
    deep = (first[0]["root"], pages // 2)
    page = _measure(
        "limit=100 from a cursor half-way", lambda: list(islice(vm.iter_mappings(start=deep), 101))
    )
    assert page[0]["position"] == pages // 2
    runs = _measure("every run (what a page used to cost)", vm.mappings)
    assert len(runs) == pages, (len(runs), pages)
    print(f"runs: {len(runs):,}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=int, default=4, help="slot size (4 GiB: 1M runs)")
    main(ap.parse_args().gib)
