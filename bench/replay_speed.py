"""Journal replay speed (prints figures, asserts nothing about time).

A VM's journal of `--records` records (default 10,000) is written through the service on a
temporary SQLite file with automatic snapshots off, shaped like QEMU's memslot traffic
(`bench/replay.py`'s trace: RAM in both address spaces, then the VGA window created and
deleted over and over; `workload`). Then:

1. Replay: a fresh service loads the VM (no snapshot: creation plus every record), timed
   in-process, several times; records per second of the best run. The process's garbage
   collector is tuned as `vkmmu serve` tunes it (`http_server.tune_gc`): with CPython's
   defaults a full collection walking the journal's live objects runs every ~70k
   allocations and is a quarter of the replay.
   The engine alone applying the same calls is timed too (the floor of any replay).
2. First answer after a restart: `vkmmu serve` started on the file (the VM never loaded),
   then the wall time of the first `GET …/stats` of that VM over HTTP, which loads it.

Each load is checked, outside the timing: the rebuilt VM's `codec.digest` equals the live VM's.

Usage: python bench/replay_speed.py [--records N] [--repeat N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.engine import Vm, codec  # noqa: E402
from app.engine.ops import parse  # noqa: E402
from app.http_server import tune_gc  # noqa: E402
from app.services.vms import VmService  # noqa: E402
from bench.service_http import Server  # noqa: E402

HVA = 0x7F2A_0000_0000
MIB = 1 << 20


def workload(n: int) -> list[tuple[str, dict[str, Any]]]:
    """`n` journaled calls shaped like QEMU's memslot traffic (`bench/replay.py`'s trace):
    RAM below and above the VGA hole in both address spaces, then the VGA window's slot
    created and deleted over and over (each delete a zap)."""

    def region(slot: int, gpa: int, size: int, hva: int) -> dict[str, Any]:
        return {
            "slot": slot,
            "flags": 0,
            "guest_phys_addr": gpa,
            "memory_size": size,
            "userspace_addr": hva,
        }

    calls: list[tuple[str, dict[str, Any]]] = []
    for as_id in (0, 1):
        calls.append(("set_user_memory_region", region(as_id << 16, 0, 0xA0000, HVA)))
        calls.append(("set_user_memory_region", region(as_id << 16 | 1, MIB, 64 * MIB, HVA + MIB)))
    i = 0
    while len(calls) < n:
        size = 0x20000 if i % 2 == 0 else 0
        calls.append(("set_user_memory_region", region(2, 0xA0000, size, 0x7F10_0000_0000)))
        i += 1
    return calls[:n]


class _Feed:
    def __init__(self, calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.calls, self.i = calls, 0

    def next_call(self) -> tuple[str, dict[str, Any]] | None:
        if self.i == len(self.calls):
            return None
        self.i += 1
        name, args = self.calls[self.i - 1]
        return name, dict(args)

    def record(self, outcome: Any) -> None:
        if isinstance(outcome, Exception):
            raise outcome


def _service(url: str) -> VmService:
    # Automatic snapshots off: the reload replays every record from the VM's creation.
    return VmService(url, snapshot_every=0, snapshot_work_bytes=0)


async def build(url: str, n: int) -> tuple[str, str]:
    svc = _service(url)
    await svc.start()
    info, _ = await svc.create_vm(name="replay", vm_type=0, vcpus=1, paging_levels=4)
    vm_id = info["id"]
    feed = _Feed(workload(n))
    while feed.i < len(feed.calls):
        await svc.mutate_many(vm_id, feed, max_calls=1000)
    digest, _ = await svc.read(vm_id, codec.digest)
    svc.evict(vm_id)  # no shutdown snapshot: the reload must replay the whole journal
    await svc.stop()
    return vm_id, digest


def _loaded(vm: Vm) -> None:
    return None


async def reload(url: str, vm_id: str) -> tuple[float, str]:
    svc = _service(url)
    await svc.start()
    t0 = time.perf_counter()
    await svc.read(vm_id, _loaded)  # loads: creation + every record
    took = time.perf_counter() - t0
    # The check, untimed: hashing the state (10,000 zap events) is no part of loading it.
    digest, _ = await svc.read(vm_id, codec.digest)
    svc.evict(vm_id)
    await svc.stop()
    return took, digest


def engine_only(n: int) -> float:
    """Seconds the engine alone takes to apply the same calls (parsed beforehand): the floor
    replay is compared with."""
    ops = [parse(name, args) for name, args in workload(n)]
    vm = Vm.create(0, 1)
    t0 = time.perf_counter()
    for op in ops:
        vm.apply(op, at=1.0)
    return time.perf_counter() - t0


def first_answer(db: Path, vm_id: str) -> tuple[float, float]:
    server = Server(db, {"VKMMU_SNAPSHOT_EVERY": "1000000"})
    try:
        c = server.client()
        t0 = time.perf_counter()
        stats = c.call("GET", f"/v1/vms/{vm_id}/stats")
        took = time.perf_counter() - t0
        assert isinstance(stats, dict)
        return server.ready_s, took
    finally:
        server.stop(kill=True)  # no shutdown snapshot: a later run replays again


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vkmmu-replay-") as tmp:
        db = Path(tmp) / "replay.db"
        url = f"sqlite:///{db}"
        t0 = time.perf_counter()
        vm_id, live = asyncio.run(build(url, args.records))
        print(f"== journal of {args.records:,} records written in {time.perf_counter() - t0:.2f} s")
        tune_gc()  # the loads below run as in `vkmmu serve`
        runs, floor = [], []
        for _ in range(args.repeat):
            took, digest = asyncio.run(reload(url, vm_id))
            assert digest == live, "the replayed VM differs from the live one"
            runs.append(took)
            floor.append(engine_only(args.records))
        best, engine = min(runs), min(floor)
        print(
            f"replay (load with no snapshot): best {best:.3f} s of {args.repeat} = "
            f"{args.records / best:,.0f} records/s (runs: {', '.join(f'{r:.3f}' for r in runs)})"
        )
        print(
            f"the engine alone on the same calls: {engine:.3f} s = "
            f"{args.records / engine:,.0f} records/s"
        )
        ready, first = first_answer(db, vm_id)
        print(f"restart: server ready in {ready:.2f} s; first answer for the VM {first:.3f} s")
    out = {
        "records": args.records,
        "replay_s": best,
        "replay_runs_s": runs,
        "records_per_s": args.records / best,
        "engine_s": engine,
        "engine_records_per_s": args.records / engine,
        "server_ready_s": ready,
        "first_answer_s": first,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
