"""Snapshots of one VM while other VMs run calls: a snapshot reads its VM and changes nothing
in it, so the other VMs' calls (whose page-table budget counts every loaded VM's tables)
never see it half-detached (issue 14 item 1: the pickle codec set `mmu.pool = None` while it
pickled, and concurrent calls on other VMs failed with a 500)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.engine import codec
from tests.persistence.conftest import ServiceFactory, sqlite_url

HVA = 0x7F00_0000_0000
MB = 1 << 20


async def test_snapshots_race_calls_on_other_vms_without_an_error(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    svc = await make_service(sqlite_url(tmp_path), snapshot_every=0)
    ids = []
    for name in ("big", "b", "c"):
        info, _ = await svc.create_vm(name=name, vm_type=0, vcpus=1)
        ids.append(info["id"])
        region = {"slot": 0, "guest_phys_addr": 0, "memory_size": 256 * MB, "userspace_addr": HVA}
        await svc.mutate(info["id"], "set_user_memory_region", region)
    big, others = ids[0], ids[1:]
    # 4K leaves over 256 MiB: enough tables that every snapshot takes a while.
    await svc.mutate(
        big, "host_advise", {"userspace_addr": HVA, "len": 256 * MB, "advice": "nohugepage"}
    )
    await svc.mutate(big, "access", {"vcpu": 0, "gpa": 0, "size": 256 * MB, "access": "write"})
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def snapshots() -> int:
        n = 0
        try:
            while n < 6:
                await svc.create_snapshot(big)
                n += 1
        finally:
            stop.set()
        return n

    async def hammer(vm_id: str) -> int:
        n, gpa = 0, 0
        while not stop.is_set():
            try:
                args = {"vcpu": 0, "gpa": gpa, "size": 64 * 4096, "access": "write"}
                await svc.mutate(vm_id, "access", args)
                await svc.mutate(vm_id, "zap", {"scope": "all"})
            except Exception as e:  # every failure counts, KvmError included
                errors.append(e)
            n += 1
            gpa = (gpa + 64 * 4096) % (256 * MB)
        return n

    made, *calls = await asyncio.gather(snapshots(), *(hammer(v) for v in others))
    assert errors == []
    assert made == 6 and all(c > 0 for c in calls)
    # The snapshots are sound and the VM they were taken of is unchanged by them.
    live, _ = await svc.read(big, codec.digest)
    snaps = await svc.list_snapshots(big)
    assert len(snaps) == 6
    await svc.stop()
    svc2 = await make_service(sqlite_url(tmp_path), snapshot_every=0)
    again, _ = await svc2.read(big, codec.digest)
    assert again == live
