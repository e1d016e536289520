"""The real engine through the service: replay rebuilds the live state exactly; restart,
snapshots, restore and fork keep state, stats and memory contents."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.orm import Session

from app.db import repository as repo
from app.db.session import Database
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory
from tests.persistence.engine_workload import HVA, MIB, drive, fingerprint
from tests.persistence.test_service import _snapshots, corrupt_snapshot


@contextmanager
def _raw_db(url: str) -> Iterator[Session]:
    db = Database(url)
    try:
        with db.read() as s:
            yield s
    finally:
        db.dispose()


async def new_vm(svc: VmService, vm_type: int = 0) -> str:
    info, _ = await svc.create_vm(
        name="real", vm_type=vm_type, vcpus=2, paging_levels=4, from_snapshot=None
    )
    return str(info["id"])


async def fp(svc: VmService, vm_id: str) -> dict[str, object]:
    value, _ = await svc.read(vm_id, fingerprint)
    return value


async def test_replay_rebuilds_live_state(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, snapshot_every=0)
    vm_id = await new_vm(svc)
    await drive(svc, vm_id)
    live = await fp(svc, vm_id)
    assert live["audit"]["ok"] is True  # type: ignore[index]
    other = await make_service(db_url, snapshot_every=0)  # creation + full replay
    assert await fp(other, vm_id) == live


async def test_restart_snapshot_restore_fork(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, snapshot_every=4)
    vm_id = await new_vm(svc)
    await drive(svc, vm_id)
    await svc.wait_background()
    snap = await svc.create_snapshot(vm_id)
    at_snap = await fp(svc, vm_id)
    await svc.mutate(vm_id, "host_write", {"userspace_addr": HVA + 0x3000, "data": "ff" * 16})
    await svc.mutate(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 16 * MIB, "access": "write"})
    live = await fp(svc, vm_id)
    await svc.stop()

    svc2 = await make_service(db_url, snapshot_every=4)
    assert await fp(svc2, vm_id) == live
    # A fork takes its kind of VM from the snapshot.
    fork, _ = await svc2.create_vm(name="fork", from_snapshot=snap["id"])
    fork_fp = await fp(svc2, fork["id"])
    assert {k: v for k, v in fork_fp.items() if k != "info"} == {
        k: v for k, v in at_snap.items() if k != "info"
    }
    await svc2.restore_snapshot(vm_id, snap["id"])
    assert await fp(svc2, vm_id) == at_snap
    await svc2.mutate(vm_id, "access", {"vcpu": 1, "gpa": 0, "size": 2 * MIB, "access": "read"})
    after_restore = await fp(svc2, vm_id)

    rebuilt = await make_service(db_url, snapshot_every=0)
    assert await fp(rebuilt, vm_id) == after_restore
    assert await fp(rebuilt, fork["id"]) == fork_fp


async def test_concurrent_calls_on_one_vm_are_serialised(
    db_url: str, make_service: ServiceFactory
) -> None:
    a = await make_service(db_url, snapshot_every=0)
    b = await make_service(db_url, snapshot_every=0)
    vm_id = await new_vm(a)
    await a.mutate(
        vm_id,
        "set_user_memory_region",
        {
            "slot": 0,
            "flags": 0,
            "guest_phys_addr": 0,
            "memory_size": 64 * MIB,
            "userspace_addr": HVA,
        },
    )

    async def worker(svc: VmService, k: int) -> None:
        for i in range(10):
            gpa = ((k * 10 + i) % 32) * 2 * MIB
            await svc.mutate(
                vm_id, "access", {"vcpu": k % 2, "gpa": gpa, "size": MIB, "access": "write"}
            )
            await svc.mutate(
                vm_id, "host_discard", {"userspace_addr": HVA + gpa, "len": 4096 * (i + 1)}
            )

    await asyncio.gather(*(worker(svc, k) for k, svc in enumerate([a, b, a, b])))
    live_a, live_b = await fp(a, vm_id), await fp(b, vm_id)
    assert live_a == live_b and live_a["audit"]["ok"] is True  # type: ignore[index]
    serial = await make_service(db_url, snapshot_every=0)
    assert await fp(serial, vm_id) == live_a


async def test_corrupt_snapshots_fall_back(
    db_url: str, make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from app.engine import codec

    svc = await make_service(db_url, snapshot_every=0)
    vm_id = await new_vm(svc)
    await drive(svc, vm_id)
    oldest = await svc.create_snapshot(vm_id)
    await svc.mutate(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 32 * MIB, "access": "write"})
    middle = await svc.create_snapshot(vm_id)
    await svc.mutate(vm_id, "host_write", {"userspace_addr": HVA, "data": "77" * 64})
    live = await fp(svc, vm_id)
    await svc.stop()
    newest = [s for s in await _snapshots(db_url, vm_id) if s.kind == "shutdown"][0]

    # The codec itself refuses a damaged blob (our row checksum is made to agree here).
    with _raw_db(db_url) as s:
        data = repo.snapshot_data(s, middle["id"])
    assert data is not None and codec.loads(data) is not None
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(data[: len(data) - 100])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(bytes(flipped))

    await corrupt_snapshot(db_url, newest.id, fix_checksum=True)
    await corrupt_snapshot(db_url, middle["id"], fix_checksum=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.services.vms"):
        svc2 = await make_service(db_url, snapshot_every=0)
        assert await fp(svc2, vm_id) == live
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert newest.id in warned and middle["id"] in warned and oldest["id"] not in warned


TABLE = 4096


async def test_page_table_budget_is_service_wide_and_replayed_as_it_was(
    db_url: str, make_service: ServiceFactory
) -> None:
    from app.db.models import JournalRecord
    from app.engine.errors import KvmError

    region = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4 * MIB}
    # 8 tables for the whole service: 4 MiB mapped in 4 KiB pages takes 5, a 2 MiB access
    # reserves its worst case, 6. Each VM alone fits; the second one, next to the first,
    # does not.
    svc = await make_service(db_url, snapshot_every=0, page_table_budget_bytes=8 * TABLE)
    a, b = await new_vm(svc), await new_vm(svc)
    for vm_id in (a, b):
        await svc.mutate(vm_id, "set_user_memory_region", {**region, "userspace_addr": HVA})
    await svc.mutate(a, "access", {"vcpu": 0, "gpa": 0, "size": 4 * MIB, "access": "write"})
    b_before = await fp(svc, b)
    with pytest.raises(KvmError) as enomem:
        await svc.mutate(b, "access", {"vcpu": 0, "gpa": 0, "size": 2 * MIB, "access": "write"})
    assert enomem.value.errno == errno.ENOMEM
    assert not getattr(enomem.value, "state_changed", False)
    assert await fp(svc, b) == b_before
    assert (await svc.get_vm(b))[1] == '"1"'  # no record

    # The budget each call ran with is journaled with it: the tables it held plus those
    # reserved for it (none for a memslot, the worst case of a 4 MiB access: 7).
    with _raw_db(db_url) as s:
        recs: list[JournalRecord] = list(repo.journal_after(s, a, 0))
    assert [r.meta["table_budget"] for r in recs if r.meta] == [0, 7]

    # A VM evicted from memory holds no tables: the other one's call fits now.
    a_live = await fp(svc, a)
    assert svc.evict(a)
    await svc.mutate(b, "access", {"vcpu": 0, "gpa": 0, "size": 2 * MIB, "access": "write"})
    b_live = await fp(svc, b)
    await svc.stop()

    # Restarted with a budget of just what A holds, below what its access ran with: replay
    # runs each call under the budget it first ran with, so it rebuilds the same state.
    tight = await make_service(db_url, snapshot_every=0, page_table_budget_bytes=5 * TABLE)
    assert await fp(tight, a) == a_live
    # New calls get what is left of the new budget: nothing; nor does B's reload fit.
    for call in (
        tight.mutate(a, "access", {"vcpu": 1, "gpa": 3 * MIB, "size": MIB}),
        tight.read(b, lambda vm: vm.info()),
    ):
        with pytest.raises(KvmError) as full:
            await call
        assert full.value.errno == errno.ENOMEM
    assert tight.evict(a)
    assert await fp(tight, b) == b_live
