"""Snapshots through the real service.

A snapshot reads its VM and changes nothing in it, so other VMs' calls (whose page-table
budget counts every loaded VM's tables) never see it half-detached (issue 14 item 1: the
pickle codec set `mmu.pool = None` while it pickled, and concurrent calls on other VMs failed
with a 500). A VERSION 1 (pickle) blob is never unpickled."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pickle
import struct
import zlib
from pathlib import Path

import pytest

from app.db.models import SnapshotRow
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


async def test_a_version_1_snapshot_is_not_unpickled_and_the_journal_rebuilds_the_vm(
    tmp_path: Path, make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A VERSION 1 (pickle) blob stored by an older build: never unpickled; the VM comes back
    from its creation plus the journal, with a log line that says why."""
    svc = await make_service(sqlite_url(tmp_path), snapshot_every=0)
    info, _ = await svc.create_vm(name="old", vm_type=0, vcpus=1)
    vm_id = info["id"]
    region = {"slot": 0, "guest_phys_addr": 0, "memory_size": 4 * MB, "userspace_addr": HVA}
    await svc.mutate(vm_id, "set_user_memory_region", region)
    await svc.mutate(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 4 * MB, "access": "write"})
    snap = await svc.create_snapshot(vm_id)
    live, _ = await svc.read(vm_id, codec.digest)
    state = zlib.compress(pickle.dumps({"a": "VERSION 1 body"}))
    body = struct.pack("<Q", len(state)) + state
    blob = codec._HEADER.pack(codec.MAGIC, 1, 0, hashlib.sha256(body).digest()) + body
    with svc.db.write() as s:
        row = s.get(SnapshotRow, snap["id"])
        assert row is not None
        row.data, row.size, row.checksum = blob, len(blob), hashlib.sha256(blob).hexdigest()
    await svc.stop()
    svc2 = await make_service(sqlite_url(tmp_path), snapshot_every=0)
    with caplog.at_level(logging.WARNING):
        again, _ = await svc2.read(vm_id, codec.digest)
    assert again == live
    assert "VERSION 1 (pickle) snapshot is not unpickled" in caplog.text
    # Retention never prunes the journal behind a snapshot this build cannot load: it is
    # the only way back to the VM's state.
    await svc2.stop()
    svc3 = await make_service(sqlite_url(tmp_path), snapshot_every=0, journal_keep=0)
    assert (await svc3.gc())["records_pruned"] == 0
    await svc3.stop()
    svc4 = await make_service(sqlite_url(tmp_path), snapshot_every=0)
    assert (await svc4.read(vm_id, codec.digest))[0] == live
