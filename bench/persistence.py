"""Persistence benchmark (prints figures, asserts nothing about time).

- Snapshot save and load of a VM with many mapped 4 KiB SPTEs: the codec alone
  (`codec.dumps` / `codec.loads`) and through the service (row write; lazy load on a
  fresh service = read + decode). Target: each under 2 s for 16M SPTEs.
- Journal append overhead on SQLite: p50 of a memslot call applied to the engine directly
  vs through `VmService.mutate` (lock, journal record, commit). Target: under 2 ms added.

Usage: python bench/persistence.py [--sptes N] [--calls N] [--db-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from app.engine import codec
from app.engine.ops import parse
from app.engine.vm import Vm
from app.services.vms import VmService

HVA = 0x7F00_0000_0000
CHUNK = 1 << 30  # fault 1 GiB per call


def _mapped_vm(sptes: int) -> Vm:
    vm = Vm.create(vm_type=0, vcpus=1)
    size = sptes * 4096
    slot_size = max(size, 1 << 21)
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": 0,
                "guest_phys_addr": 0,
                "memory_size": slot_size,
                "userspace_addr": HVA,
            },
        ),
    )
    for gpa in range(0, size, CHUNK):
        vm.apply(
            parse(
                "access", {"vcpu": 0, "gpa": gpa, "size": min(CHUNK, size - gpa), "access": "write"}
            )
        )
    return vm


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


async def bench_snapshots(sptes: int, db_dir: Path) -> None:
    print(f"== snapshot of a VM with {sptes:,} mapped 4 KiB SPTEs")
    t0 = time.perf_counter()
    vm = _mapped_vm(sptes)
    built = time.perf_counter() - t0
    print(f"build (faults):            {built:8.2f} s  pages_4k={vm.stats()['pages_4k']:,}")
    blob, t_dump = _timed(codec.dumps, vm)
    print(f"codec.dumps:               {t_dump:8.2f} s  {len(blob) / 2**20:8.1f} MiB")
    _, t_load = _timed(codec.loads, blob)
    print(f"codec.loads:               {t_load:8.2f} s")
    del vm

    url = f"sqlite+aiosqlite:///{db_dir / 'snap.db'}"
    svc = VmService(url, snapshot_every=0)
    await svc.start()
    info, _ = await svc.create_vm(
        name="big", vm_type=0, vcpus=1, paging_levels=4, from_snapshot=None
    )
    vm_id = info["id"]
    size = sptes * 4096
    await svc.mutate(
        vm_id,
        "set_user_memory_region",
        {
            "slot": 0,
            "flags": 0,
            "guest_phys_addr": 0,
            "memory_size": max(size, 1 << 21),
            "userspace_addr": HVA,
        },
    )
    for gpa in range(0, size, CHUNK):
        await svc.mutate(
            vm_id,
            "access",
            {"vcpu": 0, "gpa": gpa, "size": min(CHUNK, size - gpa), "access": "write"},
        )
    t0 = time.perf_counter()
    await svc.create_snapshot(vm_id)
    took = time.perf_counter() - t0
    print(f"service snapshot (SQLite): {took:8.2f} s  (dumps + row write + commit)")
    assert svc.evict(vm_id)  # forget the VM: the next use loads it from the database
    t0 = time.perf_counter()
    await svc.read(vm_id, lambda vm: vm.info())
    print(f"service lazy load:         {time.perf_counter() - t0:8.2f} s  (row read + loads)")
    await svc.stop()


async def bench_journal(calls: int, db_dir: Path) -> None:
    print(f"== journal append overhead, SQLite, {calls} memslot calls (create/delete)")

    def region(i: int, size: int) -> dict[str, int]:
        return {
            "slot": i % 64,
            "flags": 0,
            "guest_phys_addr": (i % 64) << 30,
            "memory_size": size,
            "userspace_addr": HVA,
        }

    vm = Vm.create(vm_type=0, vcpus=1)
    direct = []
    for i in range(calls):
        t0 = time.perf_counter()
        vm.apply(parse("set_user_memory_region", region(i, 0 if (i // 64) % 2 else 1 << 21)))
        direct.append(time.perf_counter() - t0)

    svc = VmService(f"sqlite+aiosqlite:///{db_dir / 'journal.db'}", snapshot_every=0)
    await svc.start()
    info, _ = await svc.create_vm(name="j", vm_type=0, vcpus=1, paging_levels=4, from_snapshot=None)
    via = []
    for i in range(calls):
        t0 = time.perf_counter()
        await svc.mutate(
            info["id"], "set_user_memory_region", region(i, 0 if (i // 64) % 2 else 1 << 21)
        )
        via.append(time.perf_counter() - t0)
    await svc.stop()
    p50_d, p50_s = statistics.median(direct) * 1e3, statistics.median(via) * 1e3
    p99_s = sorted(via)[int(len(via) * 0.99)] * 1e3
    print(f"engine only        p50 {p50_d:7.3f} ms")
    print(f"through service    p50 {p50_s:7.3f} ms   p99 {p99_s:7.3f} ms")
    print(f"journal overhead   p50 {p50_s - p50_d:7.3f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sptes", type=int, default=16 << 20)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--db-dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_dir = args.db_dir or Path(tmp)
        await bench_journal(args.calls, db_dir)
        await bench_snapshots(args.sptes, db_dir)


if __name__ == "__main__":
    asyncio.run(main())
