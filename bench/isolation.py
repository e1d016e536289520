"""Isolation between VMs on SQLite (prints figures, asserts nothing about time).

VM A runs large write accesses (each builds and fills page tables for `--chunk-mib` MiB)
while VM B, on the same SQLite file, does 1-byte host writes in a loop: first as single
calls, then the same accesses as one batch (`mutate_many`, what trace replay runs), then A's
reload replaying its whole journal (as after a crash). Printed: B's call latency (p50, p99,
max) alone and during each, and how long A's work took. With the engine steps outside the
write transaction B waits tens of milliseconds at most, not for A's work to finish.

Usage: python bench/isolation.py [--a-calls N] [--chunk-mib N] [--db-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
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


_REGION = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "userspace_addr": HVA}


class _Feed:
    """Calls handed to `mutate_many` one at a time."""

    def __init__(self, calls: list[tuple[str, dict[str, object]]]) -> None:
        self.calls = calls

    def next_call(self) -> tuple[str, dict[str, object]] | None:
        if not self.calls:
            return None
        op, args = self.calls.pop(0)
        return op, {**args, "access": "write"}

    def record(self, outcome: object) -> None:
        if isinstance(outcome, Exception):
            raise outcome


async def _vm(svc: VmService, size: int) -> str:
    info, _ = await svc.create_vm(name=None)
    await svc.mutate(info["id"], "set_user_memory_region", {**_REGION, "memory_size": size})
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

        async def during(a_work: Callable[[], Awaitable[None]]) -> list[float]:
            """B's latencies while `a_work` runs."""
            busy: list[float] = []
            task = asyncio.create_task(a_work())
            while not task.done():
                busy.append(await b_once())
            await task
            return busy

        def accesses(first: int) -> list[tuple[str, dict[str, object]]]:
            calls: list[tuple[str, dict[str, object]]] = []
            for i in range(first, first + a_calls):
                gpa = i * chunk_mib * MIB
                calls.append(("access", {"vcpu": 0, "gpa": gpa, "size": chunk_mib * MIB}))
            return calls

        a_times: list[float] = []

        async def single_calls() -> None:
            for op, args in accesses(0):
                t0 = time.perf_counter()
                await svc.mutate(vm_a, op, {**args, "access": "write"})
                a_times.append(time.perf_counter() - t0)

        busy = await during(single_calls)
        # The same work as one batch (what `POST …/replay` runs), then as the replay of A's
        # journal on its first call after it left memory (after a crash, a restart).
        await svc.mutate(vm_a, "set_user_memory_region", {"slot": 0, "memory_size": 0})
        await svc.mutate(vm_a, "set_user_memory_region", {**_REGION, "memory_size": size})
        batch_s: list[float] = []

        async def batch() -> None:
            t0 = time.perf_counter()
            await svc.mutate_many(vm_a, _Feed(accesses(0)), max_calls=a_calls)
            batch_s.append(time.perf_counter() - t0)

        busy_batch = await during(batch)
        assert svc.evict(vm_a)
        replay_s: list[float] = []

        async def replay() -> None:
            t0 = time.perf_counter()
            await svc.read(vm_a, lambda vm: vm.info())
            replay_s.append(time.perf_counter() - t0)

        busy_replay = await during(replay)
        print(f"== SQLite: 1-byte host writes on VM B while VM A faults {chunk_mib} MiB per call")
        _show("VM A access call", a_times)
        _show("VM B write, A idle", alone)
        _show("VM B write, A single calls", busy)
        _show(f"VM A batch of {a_calls} calls", batch_s)
        _show("VM B write, A batch", busy_batch)
        _show(f"VM A reload: replay {2 * a_calls + 3} rec", replay_s)
        _show("VM B write, A replaying", busy_replay)
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
