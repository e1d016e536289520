"""One VM's engine work never holds the database write lock (SQLite's is the whole
database's): a call that stays inside the engine on VM A does not delay a write on VM B,
whether B is served by the same process or by another one on the same file; nor does a
batch of calls (trace replay) or the replay of A's journal after a restart. Automatic
snapshots follow the work done, not only the record count."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from app.db import repository as repo
from app.engine.errors import KvmError
from tests.persistence.conftest import ServiceFactory, sqlite_url
from tests.persistence.fake_engine import FAKE_ENGINE, gate
from tests.persistence.test_service import new_vm

# A generous bound: with the write lock held across A's engine step, B would wait for
# A (here: forever, until the gate opens) or for SQLite's 60 s busy timeout.
GENEROUS_S = 10.0


async def _held_inside_engine(entered: object) -> None:
    assert hasattr(entered, "wait")
    ok = await asyncio.to_thread(entered.wait, GENEROUS_S)  # type: ignore[attr-defined]
    assert ok, "VM A's call never reached the engine"


async def test_long_call_on_one_vm_does_not_stall_another(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    url = sqlite_url(tmp_path)
    svc = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    other_process = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    vm_a, vm_b = await new_vm(svc, "a"), await new_vm(svc, "b")
    entered, release = gate("a-long")
    long_call = asyncio.create_task(svc.mutate(vm_a, "gate", {"name": "a-long"}))
    try:
        await _held_inside_engine(entered)
        # Same process, then a second service on the same file: both commit while A is
        # still inside the engine.
        _, tag = await asyncio.wait_for(svc.mutate(vm_b, "bump", {"by": 1}), GENEROUS_S)
        assert tag == '"1"'
        _, tag = await asyncio.wait_for(other_process.mutate(vm_b, "bump", {"by": 2}), GENEROUS_S)
        assert tag == '"2"'
        assert not long_call.done()
    finally:
        release.set()
    _, tag = await long_call
    assert tag == '"1"'


async def test_a_writer_of_the_same_vm_elsewhere_forces_a_redo(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    """While A's step runs outside the lock, another process appends to A: the step's
    result is dropped and the call is redone on the new state (journal stays gap-free)."""
    url = sqlite_url(tmp_path)
    svc = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    other_process = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    vm_a = await new_vm(svc, "a")
    entered, release = gate("a-redo")
    call = asyncio.create_task(svc.mutate(vm_a, "gate", {"name": "a-redo"}))
    await _held_inside_engine(entered)
    await other_process.mutate(vm_a, "bump", {"by": 5})
    release.set()  # the redo passes the gate again: it is already open
    result, tag = await call
    assert tag == '"2"'
    # The redo ran on the state with the other process's bump: 5 + 1.
    assert result == {"counter": 6}
    with svc.db.read() as s:
        assert [r.op for r in repo.journal_after(s, vm_a, 0)] == ["bump", "gate"]
    counter, _ = await other_process.read(vm_a, lambda vm: vm.state["counter"])
    assert counter == 6


async def test_snapshot_follows_work_not_only_records(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    svc = await make_service(
        sqlite_url(tmp_path), FAKE_ENGINE, snapshot_every=1000, snapshot_work_bytes=64 * 1024
    )
    vm_id = await new_vm(svc)
    for i in range(3):  # 3 records of 24 KiB each: far below 1000 records, above 64 KiB
        await svc.mutate(
            vm_id, "host_write", {"userspace_addr": 4096 * i, "data": "ab" * 12 * 1024}
        )
    await svc.wait_background()
    with svc.db.read() as s:
        snaps = repo.list_snapshots(s, vm_id)
    assert [(sn.kind, sn.seq) for sn in snaps] == [("auto", 3)]


class _Feed:
    """A batch of calls for `mutate_many`, outcomes kept."""

    def __init__(self, calls: list[tuple[str, dict[str, object]]]) -> None:
        self.calls, self.outcomes = list(calls), []  # type: ignore[var-annotated]

    def next_call(self) -> tuple[str, dict[str, object]] | None:
        return self.calls.pop(0) if self.calls else None

    def record(self, outcome: object) -> None:
        self.outcomes.append(outcome)


async def test_a_long_batch_on_one_vm_does_not_stall_another(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    """A batch (trace replay) whose engine step waits inside the engine: another VM's write
    commits meanwhile; the batch's records are appended after, in order."""
    url = sqlite_url(tmp_path)
    svc = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    vm_a, vm_b = await new_vm(svc, "a"), await new_vm(svc, "b")
    entered, release = gate("a-batch")
    feed = _Feed([("bump", {"by": 1}), ("gate", {"name": "a-batch"}), ("bump", {"by": 1})])
    batch = asyncio.create_task(svc.mutate_many(vm_a, feed))
    try:
        await _held_inside_engine(entered)
        _, tag = await asyncio.wait_for(svc.mutate(vm_b, "bump", {"by": 1}), GENEROUS_S)
        assert tag == '"1"'
        assert not batch.done()
    finally:
        release.set()
    assert await batch == (3, '"3"')
    assert [o["counter"] for o in feed.outcomes] == [1, 2, 3]  # type: ignore[index]
    with svc.db.read() as s:
        assert [r.op for r in repo.journal_after(s, vm_a, 0)] == ["bump", "gate", "bump"]


async def test_a_batch_raced_by_another_process_journals_nothing(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    url = sqlite_url(tmp_path)
    svc = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    other_process = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    vm_a = await new_vm(svc, "a")
    entered, release = gate("a-raced")
    batch = asyncio.create_task(svc.mutate_many(vm_a, _Feed([("gate", {"name": "a-raced"})])))
    await _held_inside_engine(entered)
    await other_process.mutate(vm_a, "bump", {"by": 5})
    release.set()
    with pytest.raises(KvmError) as e:
        await batch
    assert e.value.errno == errno.EBUSY
    with svc.db.read() as s:
        assert [r.op for r in repo.journal_after(s, vm_a, 0)] == ["bump"]
    counter, _ = await svc.read(vm_a, lambda vm: vm.state["counter"])
    assert counter == 5  # rebuilt from the journal: the batch's step is gone


async def test_replay_of_one_vm_does_not_stall_another(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    """After a restart, VM A's first call replays its journal (here a record that waits
    inside the engine): a write on VM B commits meanwhile."""
    url = sqlite_url(tmp_path)
    svc = await make_service(url, FAKE_ENGINE, snapshot_every=0)
    vm_a, vm_b = await new_vm(svc, "a"), await new_vm(svc, "b")
    _, release = gate("a-replay")
    release.set()  # open for the call itself
    await svc.mutate(vm_a, "gate", {"name": "a-replay"})
    assert svc.evict(vm_a)
    entered, release = gate("a-replay")  # closed for the replay
    reload = asyncio.create_task(svc.mutate(vm_a, "bump", {"by": 1}))
    try:
        await _held_inside_engine(entered)
        _, tag = await asyncio.wait_for(svc.mutate(vm_b, "bump", {"by": 1}), GENEROUS_S)
        assert tag == '"1"'
        assert not reload.done()
    finally:
        release.set()
    result, tag = await reload
    assert (result, tag) == ({"counter": 2}, '"2"')
