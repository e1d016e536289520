"""Isolation between VMs on SQLite (prints figures, asserts nothing about time).

VM A runs large write accesses (each builds and fills page tables for `--chunk-mib` MiB)
while VM B, on the same SQLite file, does 1-byte host writes in a loop. Printed: B's call
latency (p50, p99, max) alone and while A works, and how long A's calls took. With the
engine step outside the write transaction B waits tens of milliseconds at most, not for
A's call to finish.

Usage: python bench/isolation.py [--a-calls N] [--chunk-mib N] [--db-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from app.services.vms import VmService

HVA = 0x7F00_0000_0000
MIB = 1 << 20


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _show(label: str, xs: list[float]) -> None:
    print(
        f"{label:<28} n={len(xs):<5} p50={statistics.median(xs) * 1e3:8.2f} ms "
        f"p99={_pct(xs, 0.99) * 1e3:8.2f} ms max={max(xs) * 1e3:8.2f} ms"
    )


async def _vm(svc: VmService, size: int) -> str:
    info, _ = await svc.create_vm(name=None)
    region = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": size}
    await svc.mutate(info["id"], "set_user_memory_region", {**region, "userspace_addr": HVA})
    return str(info["id"])


async def main(a_calls: int, chunk_mib: int, db_dir: Path) -> None:
    svc = VmService(f"sqlite+aiosqlite:///{db_dir / 'isolation.db'}", snapshot_every=0)
    await svc.start()
    try:
        size = a_calls * chunk_mib * MIB
        vm_a, vm_b = await _vm(svc, size), await _vm(svc, 2 * MIB)

        async def b_once() -> float:
            t0 = time.perf_counter()
            await svc.mutate(vm_b, "host_write", {"userspace_addr": HVA, "data": "00"})
            return time.perf_counter() - t0

        alone = [await b_once() for _ in range(50)]
        a_times: list[float] = []
        busy: list[float] = []
        done = asyncio.Event()

        async def a_work() -> None:
            for i in range(a_calls):
                t0 = time.perf_counter()
                gpa = i * chunk_mib * MIB
                args = {"vcpu": 0, "gpa": gpa, "size": chunk_mib * MIB, "access": "write"}
                await svc.mutate(vm_a, "access", args)
                a_times.append(time.perf_counter() - t0)
            done.set()

        task = asyncio.create_task(a_work())
        while not done.is_set():
            busy.append(await b_once())
        await task
        print(f"== SQLite: 1-byte host writes on VM B while VM A faults {chunk_mib} MiB per call")
        _show("VM A access call", a_times)
        _show("VM B write, A idle", alone)
        _show("VM B write, A working", busy)
    finally:
        await svc.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--a-calls", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=512)
    ap.add_argument("--db-dir", type=Path, default=None)
    ns = ap.parse_args()
    if ns.db_dir is None:
        with tempfile.TemporaryDirectory() as d:
            asyncio.run(main(ns.a_calls, ns.chunk_mib, Path(d)))
    else:
        asyncio.run(main(ns.a_calls, ns.chunk_mib, ns.db_dir))
