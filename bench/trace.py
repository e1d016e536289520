"""Trace ring overhead (issue 10, GET …/trace): prints figures, asserts nothing about time.

The same bulk work with tracing off (`VKMMU_TRACE_RECORDS=0`) and on (the default 4,096
records): fault a slot in at 4 KiB in one `access` call, then delete the slot with
KVM_X86_QUIRK_SLOT_ZAP_ALL enabled (zap_all_fast: roots torn down, every removed table's
512 entries traced) and disabled (zap_slot_leafs: one record per leaf). Best of `--repeat`.

Usage: python bench/trace.py [--repeat N] [--gib N]
"""

from __future__ import annotations

import argparse
import time

from app.engine import Vm
from app.engine.ops import parse

HVA = 0x7F00_0000_0000
GIB = 1 << 30
DISABLE_QUIRKS2 = 213
QUIRK_SLOT_ZAP_ALL = 1 << 7


def run(capacity: int, size: int, zap_all: bool) -> tuple[float, float, int]:
    vm = Vm.create(0, 1, table_budget=1 << 22)
    vm.mmu.trace.resize(capacity)
    if not zap_all:
        args = [QUIRK_SLOT_ZAP_ALL, 0, 0, 0]
        vm.apply(parse("enable_cap", {"cap": DISABLE_QUIRKS2, "flags": 0, "args": args}))
    region = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "userspace_addr": HVA}
    vm.apply(parse("set_user_memory_region", {**region, "memory_size": size}))
    t0 = time.perf_counter()
    r = vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"}))
    t1 = time.perf_counter()
    vm.apply(parse("set_user_memory_region", {**region, "memory_size": 0}))
    t2 = time.perf_counter()
    assert r["pages"] == size // 4096 and vm.stats()["pages_4k"] == 0
    if capacity:
        assert len(vm.mmu.trace.records()) == capacity
    return t1 - t0, t2 - t1, vm.mmu.trace.written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gib", type=int, default=1)
    a = ap.parse_args()
    size = a.gib * GIB
    print(f"{size // 4096:,} SPTEs at 4 KiB, best of {a.repeat}")
    for zap_all in (True, False):
        path = "zap_all_fast" if zap_all else "zap_slot_leafs"
        best: dict[int, tuple[float, float, int]] = {}
        for cap in (0, 4096):
            runs = [run(cap, size, zap_all) for _ in range(a.repeat)]
            best[cap] = (min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2])
        (f0, z0, _), (f1, z1, n) = best[0], best[4096]
        print(
            f"{path:15} fault-in {f0 * 1e3:7.1f} ms off, {f1 * 1e3:7.1f} ms on ({f1 / f0:.2f}x); "
            f"zap {z0 * 1e3:7.1f} ms off, {z1 * 1e3:7.1f} ms on ({z1 / z0:.2f}x); "
            f"{n:,} records traced, 4,096 kept"
        )


if __name__ == "__main__":
    main()
