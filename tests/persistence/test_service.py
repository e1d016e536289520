"""VmService on SQLite and PostgreSQL: journal, versions, restart, replay, snapshots,
restore, fork, corruption and failure handling.

Tests taking `flavour` run on the real engine and on the stand-in of `fake_engine.py`; the
others use the stand-in alone because they inject a fault into the engine itself (a call that
fails after changing state, one that blocks or sleeps, a result too big to journal, a codec
whose checksum a test can forge) or count calls by a value the real engine has no op for."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from app.db import repository as repo
from app.db.models import JournalRecord, SnapshotRow
from app.db.session import Database
from app.engine.errors import KvmError
from app.services.errors import (
    ForkMismatch,
    PreconditionFailed,
    ServiceUnavailable,
    SnapshotNotFound,
    VmNotFound,
    attached_etag,
)
from app.services.vms import VmService, datetime_to_us, us_to_engine_time
from tests.persistence.conftest import ServiceFactory
from tests.persistence.fake_engine import FAKE_ENGINE, FakeVm, dumps
from tests.persistence.flavours import Flavour

U64_MAX = (1 << 64) - 1


async def new_vm(svc: VmService, name: str = "t") -> str:
    info, tag = await svc.create_vm(
        name=name, vm_type=0, vcpus=2, paging_levels=4, from_snapshot=None
    )
    assert tag == '"0"'
    return str(info["id"])


async def state(svc: VmService, vm_id: str) -> bytes:
    value, _ = await svc.read(vm_id, dumps)
    return value


async def journal(svc: VmService, vm_id: str) -> list[JournalRecord]:
    with svc.db.read() as s:
        return list(repo.journal_after(s, vm_id, 0))


def region(slot: int, gpa: int, size: int, hva: int) -> dict[str, Any]:
    return {
        "slot": slot,
        "flags": 0,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": hva,
    }


async def steps(svc: VmService, vm_id: str, flavour: Flavour, n: int = 1) -> str:
    """`n` state-changing calls; the last ETag."""
    tag = ""
    for _ in range(n):
        _, tag = await svc.mutate(vm_id, *flavour.step)
    return tag


async def some_calls(svc: VmService, vm_id: str, n: int = 5) -> None:
    await svc.mutate(vm_id, "create_vcpu", {"id": 7})
    await svc.mutate(vm_id, "set_user_memory_region", region(1, 0x100000, 0x200000, 0x7F0000000000))
    for i in range(n):
        await svc.mutate(vm_id, "bump", {"by": i + 1})


async def test_create_get_list(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    ids = [await new_vm(svc, f"vm{i}") for i in range(5)]
    info, tag = await svc.get_vm(ids[0])
    assert (info["name"], info["vm_type"], info["vm_type_name"]) == ("vm0", 0, "KVM_X86_DEFAULT_VM")
    assert (info["vcpus"], info["paging_levels"], info["tenant"], info["version"]) == (
        2,
        4,
        "default",
        0,
    )
    assert info["created_at"].endswith("Z") and tag == '"0"'
    assert info["nr_memslots"] == 0  # the engine's vm.info() is merged in

    page1, cur = await svc.list_vms(limit=3, cursor=None)
    page2, cur2 = await svc.list_vms(limit=3, cursor=cur)
    assert [v["id"] for v in page1 + page2] == sorted(ids)
    assert cur is not None and cur2 is None

    with pytest.raises(VmNotFound):
        await svc.get_vm("vm-nope")
    with pytest.raises(VmNotFound):
        await svc.mutate("vm-nope", "bump", {})
    with pytest.raises(KvmError) as ei:
        await svc.create_vm(name=None, vm_type=3, vcpus=1, paging_levels=4, from_snapshot=None)
    assert ei.value.errno == errno.EINVAL
    assert len((await svc.list_vms(limit=100, cursor=None))[0]) == 5


async def test_journal_versions_and_if_match(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    res, tag = await svc.mutate(vm_id, "create_vcpu", {"id": 5})
    assert res == {"id": 5} and tag == '"1"'
    # A rejected call changes nothing and leaves no record.
    with pytest.raises(KvmError) as ei:
        await svc.mutate(vm_id, "create_vcpu", {"id": 5})
    assert ei.value.errno == errno.EEXIST
    assert (await svc.get_vm(vm_id))[1] == '"1"'
    # If-Match: stale → 412 and nothing applied; current → applied.
    with pytest.raises(PreconditionFailed):
        await svc.mutate(vm_id, "bump", {}, if_match='"0"')
    _, tag = await svc.mutate(vm_id, "bump", {}, if_match='"1"')
    assert tag == '"2"'
    _, tag = await svc.mutate(vm_id, "bump", {}, if_match='W/"9", "2"')
    assert tag == '"3"'
    recs = await journal(svc, vm_id)
    assert [(r.seq, r.op) for r in recs] == [(1, "create_vcpu"), (2, "bump"), (3, "bump")]
    assert recs[0].args == {"id": 5} and recs[0].result == {"id": 5} and recs[0].error is None
    info, _ = await svc.get_vm(vm_id)
    assert info["version"] == 3 and info["counter"] == 2


async def test_u64_arguments_are_lossless(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    args = region(2, U64_MAX - 0xFFF, 0x1000, U64_MAX ^ 0xFFF)
    await svc.mutate(vm_id, "set_user_memory_region", args)
    (rec,) = await journal(svc, vm_id)
    assert rec.args == args and rec.args["guest_phys_addr"] == U64_MAX - 0xFFF


async def test_state_changing_error_is_journaled(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    with pytest.raises(KvmError) as ei:
        await svc.mutate(vm_id, "bump_then_fail", {})
    assert ei.value.errno == errno.EINVAL
    (rec,) = await journal(svc, vm_id)
    assert rec.error is not None and rec.error["errno_name"] == "EINVAL" and rec.result is None
    info, tag = await svc.get_vm(vm_id)
    assert tag == '"1"' and info["counter"] == 1
    live = await state(svc, vm_id)
    svc2 = await make_service(db_url, FAKE_ENGINE)  # replays the failed call too
    assert await state(svc2, vm_id) == live


async def test_restart_keeps_everything(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    await some_calls(svc, vm_id)
    before, tag = await svc.read(vm_id, dumps)
    await svc.stop()  # takes a shutdown snapshot
    svc2 = await make_service(db_url, FAKE_ENGINE)
    assert svc2.loaded_vms() == {}  # lazy: nothing loads until used
    after, tag2 = await svc2.read(vm_id, dumps)
    assert (after, tag2) == (before, tag)
    assert [s["kind"] for s in await svc2.list_snapshots(vm_id)] == ["shutdown"]
    assert set(svc2.loaded_vms()) == {vm_id}


async def test_replay_equals_live_state(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    vm_id = await new_vm(svc)
    await some_calls(svc, vm_id, n=20)
    live = await state(svc, vm_id)
    # A second service on the same database has no snapshot: creation + full replay.
    other = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    assert await state(other, vm_id) == live
    # Both see each other's calls.
    await other.mutate(vm_id, "bump", {"by": 100})
    (value, tag) = await svc.read(vm_id, lambda vm: vm.state["counter"])
    assert value == sum(range(1, 21)) + 100 and tag == '"23"'


async def test_auto_snapshots_and_pruning(
    db_url: str, make_service: ServiceFactory, flavour: Flavour
) -> None:
    svc = await make_service(db_url, flavour.engine, snapshot_every=5)
    vm_id = await new_vm(svc)
    for _ in range(23):
        await steps(svc, vm_id, flavour)
        await svc.wait_background()
    snaps = await svc.list_snapshots(vm_id)
    assert [s["seq"] for s in snaps] == [15, 20] and {s["kind"] for s in snaps} == {"auto"}
    manual = await svc.create_snapshot(vm_id)
    assert manual["seq"] == 23 and manual["kind"] == "manual"
    svc2 = await make_service(db_url, flavour.engine, snapshot_every=5)
    live, _ = await svc.read(vm_id, flavour.dumps)
    rebuilt, _ = await svc2.read(vm_id, flavour.dumps)  # from the snapshot at 20, then 3 records
    assert rebuilt == live
    assert (await svc2.read(vm_id, flavour.count))[0] == 23


async def corrupt_snapshot(url: str, snap_id: str, *, fix_checksum: bool) -> None:
    """Damage a stored snapshot: truncated (our checksum sees it), or altered with a matching
    checksum (only the codec's own checksum sees it)."""
    db = Database(url)
    with db.write() as s:
        data = repo.snapshot_data(s, snap_id)
        assert data is not None
        values: dict[str, Any] = {"data": data[: len(data) // 2]}
        if fix_checksum:
            bad = data[:-1] + bytes([data[-1] ^ 0xFF])
            values = {"data": bad, "size": len(bad), "checksum": hashlib.sha256(bad).hexdigest()}
        s.execute(update(SnapshotRow).where(SnapshotRow.id == snap_id).values(**values))
    db.dispose()


@pytest.mark.parametrize("fix_checksum", [False, True])
async def test_corrupt_snapshot_falls_back(
    db_url: str, make_service: ServiceFactory, caplog: pytest.LogCaptureFixture, fix_checksum: bool
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    await some_calls(svc, vm_id)
    old = await svc.create_snapshot(vm_id)
    await svc.mutate(vm_id, "bump", {"by": 1000})
    live = await state(svc, vm_id)
    await svc.stop()
    shutdown = [s for s in await _snapshots(db_url, vm_id) if s.kind == "shutdown"]
    assert len(shutdown) == 1

    # Newest snapshot damaged: the older one plus one journal record.
    await corrupt_snapshot(db_url, shutdown[0].id, fix_checksum=fix_checksum)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.services.vms"):
        svc2 = await make_service(db_url, FAKE_ENGINE)
        assert await state(svc2, vm_id) == live
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and shutdown[0].id in warnings[0] and "corrupt" in warnings[0]
    await svc2.stop()  # nothing changed: no new shutdown snapshot

    # Every snapshot damaged: creation plus the whole journal.
    await corrupt_snapshot(db_url, old["id"], fix_checksum=fix_checksum)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.services.vms"):
        svc3 = await make_service(db_url, FAKE_ENGINE)
        assert await state(svc3, vm_id) == live
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

    # A fork from a damaged snapshot is rebuilt from its source's journal.
    info, _ = await svc3.create_vm(name="f", from_snapshot=old["id"])
    before_bump, _ = await svc3.read(vm_id, lambda vm: vm.state["counter"])
    fork_counter, _ = await svc3.read(info["id"], lambda vm: vm.state["counter"])
    assert fork_counter == before_bump - 1000


async def _snapshots(url: str, vm_id: str) -> list[SnapshotRow]:
    db = Database(url)
    with db.read() as s:
        rows = list(repo.list_snapshots(s, vm_id))
    db.dispose()
    return rows


async def test_restore_and_replay_through_restore(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    vm_id = await new_vm(svc)
    await some_calls(svc, vm_id)
    snap = await svc.create_snapshot(vm_id)
    at_snap = await state(svc, vm_id)
    await svc.mutate(vm_id, "bump", {"by": 50})
    await svc.mutate(vm_id, "set_user_memory_region", region(3, 0x400000, 0x1000, 0x7F0000400000))
    info, tag = await svc.restore_snapshot(vm_id, snap["id"])
    assert tag == '"10"' and info["version"] == 10
    assert await state(svc, vm_id) == at_snap
    await svc.mutate(vm_id, "bump", {"by": 3})
    live = await state(svc, vm_id)
    recs = await journal(svc, vm_id)
    assert recs[9].op == "restore" and recs[9].args == {"snapshot_id": snap["id"], "seq": 7}

    # Rebuilt on a fresh service: from the copy of the snapshot the restore kept at its seq.
    other = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    assert await state(other, vm_id) == live

    with pytest.raises(SnapshotNotFound):
        await svc.restore_snapshot(vm_id, "snap-nope")
    vm2 = await new_vm(svc, "other")
    with pytest.raises(SnapshotNotFound):  # another VM's snapshot is not a restore point
        await svc.restore_snapshot(vm2, snap["id"])


async def test_fork(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    src = await new_vm(svc)
    await some_calls(svc, src)
    snap = await svc.create_snapshot(src)
    at_snap = await state(svc, src)
    # A fork is its snapshot's kind of VM: asking for another kind is refused, naming what
    # differs; asking for the same kind (or nothing) forks.
    with pytest.raises(ForkMismatch) as mismatch:
        await svc.create_vm(
            name="fork", vm_type=1, vcpus=2, paging_levels=5, from_snapshot=snap["id"]
        )
    assert mismatch.value.fields == {"vm_type": (1, 0), "paging_levels": (5, 4)}
    assert len((await svc.list_vms(limit=100, cursor=None))[0]) == 1
    info, tag = await svc.create_vm(name="fork", vcpus=2, from_snapshot=snap["id"])
    fork = info["id"]
    assert tag == '"0"' and (info["vm_type"], info["vcpus"], info["name"]) == (0, 2, "fork")
    assert await state(svc, fork) == at_snap
    await svc.mutate(fork, "bump", {"by": 7})
    await svc.mutate(src, "bump", {"by": 9})
    s_fork, s_src = await state(svc, fork), await state(svc, src)
    assert s_fork != s_src
    await svc.stop()
    svc2 = await make_service(db_url, FAKE_ENGINE)
    assert await state(svc2, fork) == s_fork and await state(svc2, src) == s_src
    with pytest.raises(SnapshotNotFound):
        await svc2.create_vm(name=None, vm_type=0, vcpus=1, paging_levels=4, from_snapshot="x")
    # The snapshots of a deleted VM went with it: no fork from them (like their list).
    await svc2.delete_vm(src)
    with pytest.raises(SnapshotNotFound):
        await svc2.create_vm(name=None, from_snapshot=snap["id"])
    with pytest.raises(VmNotFound):
        await svc2.list_snapshots(src)


async def test_delete(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    keep = await new_vm(svc)
    await some_calls(svc, vm_id)
    res = await svc.delete_vm(vm_id)
    assert res == {"zapped": 0}
    for call in (svc.get_vm(vm_id), svc.read(vm_id, dumps), svc.mutate(vm_id, "bump", {})):
        with pytest.raises(VmNotFound):
            await call
    with pytest.raises(VmNotFound):
        await svc.delete_vm(vm_id)
    assert [v["id"] for v in (await svc.list_vms(limit=10, cursor=None))[0]] == [keep]
    assert vm_id not in svc.loaded_vms()
    assert await journal(svc, vm_id) == []  # retention: the journal went with the VM
    with pytest.raises(KvmError):  # destroy and restore have their own entry points
        await svc.mutate(keep, "destroy", {})


async def test_big_results_are_summarised(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    res, _ = await svc.mutate(vm_id, "big_result", {"n": 100_000})
    assert len(res["data"]) == 200_000
    (rec,) = await journal(svc, vm_id)
    assert rec.result is not None and rec.result["_summary"] is True
    assert rec.result["keys"] == ["data"]


async def test_failed_commit_discards_memory(
    db_url: str, make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch, flavour: Flavour
) -> None:
    svc = await make_service(db_url, flavour.engine)
    vm_id = await new_vm(svc)
    await steps(svc, vm_id, flavour)
    before, _ = await svc.read(vm_id, flavour.dumps)

    def broken_append(*a: Any, **kw: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(repo.JournalWriter, "append", broken_append)
    with pytest.raises(RuntimeError):
        await steps(svc, vm_id, flavour)
    assert vm_id not in svc.loaded_vms()  # applied in memory, not journaled: discarded
    monkeypatch.undo()
    after, tag = await svc.read(vm_id, flavour.dumps)
    assert (after, tag) == (before, '"1"')
    assert (await svc.read(vm_id, flavour.count))[0] == 1
    assert await steps(svc, vm_id, flavour) == '"2"'


async def test_cancelled_call_never_overlaps_the_next(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    task = asyncio.create_task(svc.mutate(vm_id, "slow", {"s": 0.3}))
    await asyncio.sleep(0.1)
    task.cancel()
    nxt = asyncio.create_task(svc.mutate(vm_id, "bump", {"by": 10}))
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker thread cannot be stopped: it finished (and committed) the slow call before
    # the VM lock was released, so the next call ran after it, never alongside it.
    _, tag = await nxt
    assert tag == '"2"'
    assert [(r.seq, r.op) for r in await journal(svc, vm_id)] == [(1, "slow"), (2, "bump")]
    counter, _ = await svc.read(vm_id, lambda vm: vm.state["counter"])
    assert counter == 11
    other = await make_service(db_url, FAKE_ENGINE)
    assert await state(other, vm_id) == await state(svc, vm_id)


async def test_two_services_one_database(db_url: str, make_service: ServiceFactory) -> None:
    a = await make_service(db_url, FAKE_ENGINE, snapshot_every=7)
    b = await make_service(db_url, FAKE_ENGINE, snapshot_every=7)
    vm_id = await new_vm(a)

    async def hammer(svc: VmService, base: int) -> None:
        for i in range(25):
            await svc.mutate(vm_id, "bump", {"by": base + i})

    await asyncio.gather(hammer(a, 1000), hammer(b, 2000), hammer(a, 3000), hammer(b, 4000))
    await a.wait_background()
    await b.wait_background()
    recs = await journal(a, vm_id)
    assert [r.seq for r in recs] == list(range(1, 101))
    serial = FakeVm.create(vcpus=2, name="t")
    for r in recs:
        serial.apply(r.op, r.args, at=us_to_engine_time(datetime_to_us(r.at)))
    assert await state(a, vm_id) == dumps(serial) == await state(b, vm_id)
    assert serial.state["counter"] == sum(
        base + i for base in (1000, 2000, 3000, 4000) for i in range(25)
    )


async def test_delete_seen_by_another_service(
    db_url: str, make_service: ServiceFactory, flavour: Flavour
) -> None:
    a = await make_service(db_url, flavour.engine)
    b = await make_service(db_url, flavour.engine)
    vm_id = await new_vm(a)
    await steps(a, vm_id, flavour)
    await steps(b, vm_id, flavour)  # b loads it (creation + replay of a's record)
    assert (await b.read(vm_id, flavour.count))[0] == 2
    assert vm_id in a.loaded_vms() and vm_id in b.loaded_vms()
    await b.delete_vm(vm_id)
    with pytest.raises(VmNotFound):
        await steps(a, vm_id, flavour)
    assert vm_id not in a.loaded_vms()
    with pytest.raises(VmNotFound):
        await a.read(vm_id, flavour.count)


async def test_evict_reloads_lazily(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    await some_calls(svc, vm_id)
    before = await state(svc, vm_id)
    assert svc.evict(vm_id) and vm_id not in svc.loaded_vms()
    assert not svc.evict(vm_id)
    assert await state(svc, vm_id) == before


async def test_state_changing_error_carries_the_new_etag(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    await svc.mutate(vm_id, "bump", {})
    with pytest.raises(KvmError) as changed:
        await svc.mutate(vm_id, "bump_then_fail", {})
    assert attached_etag(changed.value) == '"2"' == (await svc.get_vm(vm_id))[1]
    with pytest.raises(KvmError) as unchanged:
        await svc.mutate(vm_id, "create_vcpu", {"id": 0})
    assert attached_etag(unchanged.value) is None


async def test_delete_and_restore_honour_if_match(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    vm_id = await new_vm(svc)
    snap = await svc.create_snapshot(vm_id)
    await svc.mutate(vm_id, "bump", {})
    with pytest.raises(PreconditionFailed) as stale:
        await svc.restore_snapshot(vm_id, snap["id"], if_match='"0"')
    assert stale.value.current == '"1"'
    with pytest.raises(PreconditionFailed):
        await svc.delete_vm(vm_id, if_match='W/"1"')  # weak: never matches
    assert [r.op for r in await journal(svc, vm_id)] == ["bump"]
    _, tag = await svc.restore_snapshot(vm_id, snap["id"], if_match='"1"')
    await svc.delete_vm(vm_id, if_match=tag)
    with pytest.raises(VmNotFound):
        await svc.get_vm(vm_id)


async def test_loaded_vms_are_capped_lru(
    db_url: str, make_service: ServiceFactory, flavour: Flavour
) -> None:
    svc = await make_service(db_url, flavour.engine, max_loaded_vms=2)
    ids = [await new_vm(svc, f"vm{i}") for i in range(4)]
    assert sorted(svc.loaded_vms()) == sorted(ids[2:])  # the two created last
    for i, vm_id in enumerate(ids):
        await steps(svc, vm_id, flavour, i + 1)
        assert len(svc.loaded_vms()) <= 2
    assert sorted(svc.loaded_vms()) == sorted(ids[2:])
    await svc.read(ids[0], lambda vm: None)  # ids[2] is now the least recently used
    assert sorted(svc.loaded_vms()) == sorted([ids[0], ids[3]])
    for i, vm_id in enumerate(ids):  # evicted VMs come back from their journal intact
        counter, _ = await svc.read(vm_id, flavour.count)
        assert counter == i + 1


async def test_stats_summaries_cover_vms_not_loaded(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE)
    a, b = await new_vm(svc, "a"), await new_vm(svc, "b")
    await svc.mutate(a, "bump", {"by": 5})
    await svc.mutate(b, "create_vcpu", {"id": 9})
    assert svc.evict(a)
    assert await svc.stats_summaries() == {
        a: {"counter": 5, "vcpus": 2},
        b: {"counter": 0, "vcpus": 3},
    }
    assert a not in svc.loaded_vms()  # answered from the rows
    assert "stats" not in (await svc.get_vm(a))[0]
    other = await make_service(db_url, FAKE_ENGINE)  # another process sees the same
    assert (await other.stats_summaries())[a] == {"counter": 5, "vcpus": 2}
    await svc.delete_vm(b)
    assert list(await svc.stats_summaries()) == [a]


async def test_database_outage_is_service_unavailable(
    db_url: str, make_service: ServiceFactory, flavour: Flavour
) -> None:
    svc = await make_service(db_url, flavour.engine)
    vm_id = await new_vm(svc)
    await steps(svc, vm_id, flavour)
    working = svc._db
    down = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # connection refused
    svc._db = down
    try:
        for call in (
            steps(svc, vm_id, flavour),
            svc.get_vm(vm_id),
            svc.list_vms(limit=10, cursor=None),
            svc.create_vm(name="x"),
            svc.create_snapshot(vm_id),
            svc.stats_summaries(),
        ):
            with pytest.raises(ServiceUnavailable) as e:
                await call
            assert "OperationalError" in e.value.reason
        assert (await svc.ready())["ok"] is False
    finally:
        svc._db = working
        down.dispose()
    # Nothing was applied while the database was out.
    counter, tag = await svc.read(vm_id, flavour.count)
    assert (counter, tag) == (1, '"1"')
    assert len((await svc.list_vms(limit=10, cursor=None))[0]) == 1


async def test_integrity_errors_are_not_outages(
    db_url: str, make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch, flavour: Flavour
) -> None:
    svc = await make_service(db_url, flavour.engine)
    vm_id = await new_vm(svc)
    # Two records with one sequence number: a bug, not the database being away.
    monkeypatch.setattr("app.services.vms.new_id", lambda prefix: vm_id)
    with pytest.raises(IntegrityError):
        await svc.create_vm(name="dup")
    assert (await svc.ready())["ok"] is True  # the database is there: no outage reported
    monkeypatch.undo()
    await steps(svc, vm_id, flavour)
    assert (await svc.read(vm_id, flavour.count))[0] == 1
