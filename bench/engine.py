"""Engine benchmark (issue 3): prints figures, asserts nothing about time.

1. Fault in a 4 GiB slot at 4 KiB in one `access` call (1,048,576 SPTEs) vs numpy writing the
   same entries into 2048 arrays of 512 entries, in the same run -> ratio (target: <= 10x).
2. Zap them: memslot delete with KVM_X86_QUIRK_SLOT_ZAP_ALL disabled (zap_slot_leafs) and
   enabled (zap_all_fast) vs numpy writing the non-present value into the same arrays.
2b. Fault in 16 GiB backed by 2 MiB host pages (THP: MADV_HUGEPAGE) vs the same at 4 KiB, in the
   same run -> how much faster per GiB (target over HTTP: >= 10x); then huge-page recovery
   of 16 GiB of THP faulted at 4 KiB while dirty logging was on, when logging stops.
3. Resident memory per mapped 4 KiB SPTE of a VM with 16M SPTEs (RSS delta, /proc/self/statm;
   measured in a child process so earlier allocations do not blur it; target: <= 9 bytes).
4. Snapshot codec (`codec.dumps` / `codec.loads`) of that VM.

Usage: python bench/engine.py [--repeat N] [--sptes N] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from app.engine import Vm, codec
from app.engine import spte as S
from app.engine.ops import parse

HVA = 0x7F00_0000_0000
PAGE = 4096
GIB = 1 << 30
DISABLE_QUIRKS2 = 213
QUIRK_SLOT_ZAP_ALL = 1 << 7
TABLE = 512


def mapped_vm(
    size: int, *, zap_all_quirk: bool = True, table_budget: int | None = None, thp: bool = False
) -> Vm:
    """Slot 0 over [0, size), on transparent huge pages with `thp`."""
    kw = {} if table_budget is None else {"table_budget": table_budget}
    vm = Vm.create(0, 1, **kw)
    if thp:
        vm.apply(parse("host_advise", {"userspace_addr": HVA, "len": size, "advice": "hugepage"}))
    if not zap_all_quirk:
        vm.apply(
            parse(
                "enable_cap",
                {"cap": DISABLE_QUIRKS2, "flags": 0, "args": [QUIRK_SLOT_ZAP_ALL, 0, 0, 0]},
            ),
        )
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": 0,
                "guest_phys_addr": 0,
                "memory_size": size,
                "userspace_addr": HVA,
            },
        ),
    )
    return vm


def fault_all(vm: Vm, size: int) -> dict[str, Any]:
    res = vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"}))
    assert res["exit"] is None and res["levels"]["4k"] == size // PAGE, res  # sanity, not time
    return res


def delete_slot(vm: Vm) -> dict[str, Any]:
    return vm.apply(
        parse(
            "set_user_memory_region",
            {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": HVA},
        ),
    )


# -- numpy floors -------------------------------------------------------------------------------
def numpy_write(arrays: list[np.ndarray], pfn0: int) -> None:
    """The same leaf entries the engine writes: bits | pfn << 12, one 512-entry table at a time."""
    bits = np.uint64(
        S.leaf_bits(
            level=1, writable=True, host_writable=True, exec_=True, ipat=True, accessed=True
        )
    )
    ar = np.arange(TABLE, dtype=np.uint64)
    shift = np.uint64(S.PFN_SHIFT)
    for i, a in enumerate(arrays):
        a[:] = bits | ((np.uint64(pfn0 + i * TABLE) + ar) << shift)


def numpy_zap(arrays: list[np.ndarray]) -> int:
    """The least a zap does per table: find the present leaves, count them, clear them."""
    present = np.uint64(S.SPTE_MMU_PRESENT)
    n = 0
    for a in arrays:
        leaf = (a & present) != 0
        n += int(np.count_nonzero(leaf))
        a[leaf] = S.NONPRESENT
    return n


# -- 1 and 2: speed -----------------------------------------------------------------------------
def bench_speed(repeat: int) -> tuple[float, float, list[tuple[str, float]]]:
    """(numpy write, numpy zap, [(operation, engine seconds)]), each the best of `repeat`.

    The floors and the engine run interleaved, so a busy machine slows both alike.
    """
    size = 4 * GIB
    n_tables = size // PAGE // TABLE
    arrays = [np.empty(TABLE, dtype=np.uint64) for _ in range(n_tables)]
    t: dict[str, list[float]] = {k: [] for k in ("write", "zap", "fault", "leafs", "fast")}

    def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        t[key].append(time.perf_counter() - t0)
        return out

    for _ in range(repeat):
        timed("write", numpy_write, arrays, HVA >> 12)
        assert timed("zap", numpy_zap, arrays) == size // PAGE

        vm = mapped_vm(size, zap_all_quirk=False)
        timed("fault", fault_all, vm, size)
        zap = timed("leafs", delete_slot, vm)["zap"]
        assert zap["path"] == "zap_slot_leafs" and zap["sptes_zapped_total"] == size // PAGE
        del vm

        vm = mapped_vm(size, zap_all_quirk=True)
        fault_all(vm, size)
        zap = timed("fast", delete_slot, vm)["zap"]
        assert zap["path"] == "zap_all_fast" and zap["sptes_zapped_total"] == size // PAGE
        del vm
    return (
        min(t["write"]),
        min(t["zap"]),
        [
            ("fault 4 GiB @4K, one access", min(t["fault"])),
            ("delete, zap_slot_leafs", min(t["leafs"])),
            ("delete, zap_all_fast", min(t["fast"])),
        ],
    )


def huge_vs_4k(repeat: int) -> tuple[float, float]:
    """(seconds for 16 GiB at 4 KiB, seconds for 16 GiB on 2 MiB host pages), best of `repeat`."""
    size = 16 * GIB
    t4, t2 = [], []
    for _ in range(repeat):
        vm = mapped_vm(size, table_budget=1 << 22)
        t0 = time.perf_counter()
        fault_all(vm, size)
        t4.append(time.perf_counter() - t0)
        del vm
        vm = mapped_vm(size, thp=True)
        t0 = time.perf_counter()
        res = vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"}))
        t2.append(time.perf_counter() - t0)
        assert res["levels"]["2m"] == size >> 21, res  # sanity, not time
        del vm
    return min(t4), min(t2)


def set_log_dirty(vm: Vm, size: int, on: bool) -> dict[str, Any]:
    """Slot 0 over [0, size) with KVM_MEM_LOG_DIRTY_PAGES on or off (a flags-only change)."""
    args = {"slot": 0, "flags": int(on), "guest_phys_addr": 0, "memory_size": size}
    return vm.apply(parse("set_user_memory_region", {**args, "userspace_addr": HVA}))


def recovery(repeat: int) -> float:
    """Seconds for huge-page recovery when dirty logging stops on 16 GiB of THP faulted at
    4 KiB while logging (8,192 leaf tables become 2 MiB leaves), best of `repeat`."""
    size = 16 * GIB
    t = []
    for _ in range(repeat):
        vm = mapped_vm(size, thp=True)
        set_log_dirty(vm, size, True)
        fault_all(vm, size)
        t0 = time.perf_counter()
        zap = set_log_dirty(vm, size, False)["zap"]
        t.append(time.perf_counter() - t0)
        assert zap["huge_pages_recovered"] == size >> 21, zap  # sanity, not time
        del vm
    return min(t)


# -- 3 and 4: memory and codec (child process) ----------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(sptes: int) -> dict[str, Any]:
    size = sptes * PAGE
    before = rss_bytes()
    vm = mapped_vm(size, table_budget=1 << 22)
    t0 = time.perf_counter()
    for gpa in range(0, size, 64 * GIB):  # one call per 64 GiB (16M SPTEs: a single call)
        n = min(64 * GIB, size - gpa)
        res = vm.apply(parse("access", {"vcpu": 0, "gpa": gpa, "size": n, "access": "write"}))
        assert res["exit"] is None
    t_fault = time.perf_counter() - t0
    after = rss_bytes()
    mapped = vm.stats()["pages_4k"]
    t0 = time.perf_counter()
    blob = codec.dumps(vm)
    t_dump = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = codec.loads(blob)
    t_load = time.perf_counter() - t0
    assert back.stats()["pages_4k"] == mapped
    return {
        "sptes": mapped,
        "rss_delta": after - before,
        "fault_s": t_fault,
        "page_tables": vm.stats()["page_tables"],
        "dumps_s": t_dump,
        "loads_s": t_load,
        "snapshot_bytes": len(blob),
    }


def bench_memory(sptes: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(sptes)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="runs per timing; the best is kept")
    ap.add_argument("--sptes", type=int, default=16 << 20, help="SPTEs of the memory VM")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--huge-json", action="store_true", help="only the 16 GiB faults, as JSON")
    args = ap.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return
    if args.huge_json:  # bench/run.py: the 2 MiB row without any per-call cost
        t4, t2 = huge_vs_4k(args.repeat)
        print(json.dumps({"repeat": args.repeat, "fault_16g_4k_s": t4, "fault_16g_2m_s": t2}))
        return

    t_write, t_zap, rows = bench_speed(args.repeat)
    print(f"== engine speed: 1,048,576 SPTEs (4 GiB at 4 KiB), best of {args.repeat}")
    print(f"numpy floor, write the leaf entries into 2048 x 512-entry arrays: {t_write:.4f} s")
    print(f"numpy floor, zap them (find present, count, clear):              {t_zap:.4f} s")
    print(f"{'operation':<32} {'engine s':>9} {'/ write':>8} {'/ zap':>8}   target")
    for name, t in rows:
        print(f"{name:<32} {t:9.4f} {t / t_write:7.1f}x {t / t_zap:7.1f}x   <= 10x the write")
    t4, t2 = huge_vs_4k(args.repeat)
    print(f"== 16 GiB fault, best of {args.repeat}")
    print(f"{'at 4 KiB (4,194,304 SPTEs)':<32} {t4:9.4f} s")
    print(f"{'on 2 MiB host pages (8,192)':<32} {t2:9.4f} s   {t4 / t2:.1f}x faster per GiB")
    t_rec = recovery(args.repeat)
    print(f"{'recovery of it at 4 KiB on THP':<32} {t_rec:9.4f} s   (dirty logging off)")
    if args.skip_memory:
        return
    m = bench_memory(args.sptes)
    per = m["rss_delta"] / m["sptes"]
    print(
        f"== engine memory: a VM with {m['sptes']:,} mapped 4 KiB SPTEs "
        f"({m['page_tables']:,} page-table pages)"
    )
    print(f"{'fault-in (64 GiB per call)':<32} {m['fault_s']:10.2f} s")
    print(f"{'RSS delta':<32} {m['rss_delta'] / 2**20:10.1f} MiB")
    print(f"{'bytes per mapped SPTE':<32} {per:10.2f}    target <= 9 (hardware: 8)")
    print(f"{'codec.dumps':<32} {m['dumps_s']:10.2f} s   {m['snapshot_bytes'] / 2**20:.1f} MiB")
    print(f"{'codec.loads':<32} {m['loads_s']:10.2f} s")


if __name__ == "__main__":
    main()
