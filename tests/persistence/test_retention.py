"""Retention: deleted VMs take their journal and snapshots with them (the row is purged
after the retention), journals are pruned behind snapshots beyond `journal_keep`, manual
snapshots are capped, labelled, fetched and deleted, and the database stays bounded over a
long run. Migration 0003 upgrades a 0002 database in place."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from app.db import repository as repo
from app.db.models import JournalRecord, SnapshotRow, VmRow
from app.db.session import sync_url
from app.engine.errors import KvmError
from app.services.errors import SnapshotNotFound, VmNotFound
from app.services.lifecycle import migrate
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory, sqlite_url
from tests.persistence.fake_engine import FAKE_ENGINE
from tests.persistence.test_service import journal, new_vm, state


def _counts(svc: VmService) -> tuple[int, int, int]:
    with svc.db.read() as s:
        vms = s.execute(select(func.count()).select_from(VmRow)).scalar_one()
        recs = s.execute(select(func.count()).select_from(JournalRecord)).scalar_one()
        snaps = s.execute(select(func.count()).select_from(SnapshotRow)).scalar_one()
    return int(vms), int(recs), int(snaps)


async def test_delete_removes_journal_and_snapshots(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, retention_s=0)
    keep, gone = await new_vm(svc, "keep"), await new_vm(svc, "gone")
    for vm in (keep, gone):
        await svc.mutate(vm, "bump", {"by": 1})
        await svc.create_snapshot(vm, label="x")
    await svc.delete_vm(gone)
    assert await journal(svc, gone) == []
    with svc.db.read() as s:
        assert repo.list_snapshots(s, gone) == []
        assert repo.get_vm_any(s, gone) is not None  # the tombstone, until gc
    out = await svc.gc()
    assert out["rows_removed"] == 1
    with svc.db.read() as s:
        assert repo.get_vm_any(s, gone) is None
    assert _counts(svc) == (1, 1, 1)
    with pytest.raises(VmNotFound):
        await svc.get_vm(gone)


async def test_fork_outlives_its_source(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    src = await new_vm(svc)
    await svc.mutate(src, "bump", {"by": 4})
    snap = await svc.create_snapshot(src)
    info, _ = await svc.create_vm(name="fork", from_snapshot=snap["id"])
    fork = info["id"]
    await svc.mutate(fork, "bump", {"by": 1})
    expected = await state(svc, fork)
    await svc.delete_vm(src)
    fresh = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    assert await state(fresh, fork) == expected


async def test_journal_pruned_behind_snapshots(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0, journal_keep=3)
    vm = await new_vm(svc)
    for i in range(10):
        await svc.mutate(vm, "bump", {"by": i})
    assert (await svc.gc())["records_pruned"] == 0  # no snapshot yet: everything is needed
    await svc.create_snapshot(vm, kind="auto")
    for i in range(4):
        await svc.mutate(vm, "bump", {"by": 100 + i})
    out = await svc.gc()
    # Behind the snapshot (seq 10), all but the last 3 of 14 records: seq 1..10 go.
    assert out["records_pruned"] == 10
    assert [r.seq for r in await journal(svc, vm)] == [11, 12, 13, 14]
    expected = await state(svc, vm)
    fresh = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    assert await state(fresh, vm) == expected


async def test_background_gc_prunes_without_being_asked(
    db_url: str, make_service: ServiceFactory
) -> None:
    """`gc_interval_s` (what `vkmmu serve` sets from VKMMU_GC_INTERVAL_S) runs gc in the
    background: the journal behind a snapshot goes with no call to gc."""
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0, journal_keep=0)
    vm = await new_vm(svc)
    for i in range(5):
        await svc.mutate(vm, "bump", {"by": i})
    await svc.create_snapshot(vm, kind="auto")
    assert len(await journal(svc, vm)) == 5  # nothing pruned by itself
    await svc.stop()
    background = await make_service(
        db_url, FAKE_ENGINE, snapshot_every=0, journal_keep=0, gc_interval_s=0.05
    )
    for _ in range(600):  # up to a minute on a loaded machine; usually a few passes
        if await journal(background, vm) == []:
            break
        await asyncio.sleep(0.1)
    assert await journal(background, vm) == []
    assert (await background.read(vm, lambda v: v.state["counter"]))[0] == 10


async def test_manual_snapshots_capped_labelled_and_deletable(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0, max_manual_snapshots=2)
    vm = await new_vm(svc)
    await svc.mutate(vm, "bump", {"by": 1})
    a = await svc.create_snapshot(vm, label="before upgrade")
    b = await svc.create_snapshot(vm)
    with pytest.raises(KvmError) as full:
        await svc.create_snapshot(vm)
    assert full.value.errno == errno.ENOMEM
    got = await svc.get_snapshot(vm, a["id"])
    assert got["label"] == "before upgrade" and got["seq"] == 1
    await svc.delete_snapshot(vm, a["id"])
    with pytest.raises(SnapshotNotFound):
        await svc.get_snapshot(vm, a["id"])
    await svc.create_snapshot(vm)  # room again
    other = await new_vm(svc, "other")
    with pytest.raises(SnapshotNotFound):  # not the other VM's
        await svc.delete_snapshot(other, b["id"])


async def test_the_only_base_cannot_be_deleted(db_url: str, make_service: ServiceFactory) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0, journal_keep=0)
    vm = await new_vm(svc)
    await svc.mutate(vm, "bump", {"by": 1})
    base = await svc.create_snapshot(vm)
    await svc.mutate(vm, "bump", {"by": 2})
    assert (await svc.gc())["records_pruned"] == 1
    with pytest.raises(KvmError) as busy:
        await svc.delete_snapshot(vm, base["id"])
    assert busy.value.errno == errno.EBUSY
    newer = await svc.create_snapshot(vm)
    await svc.delete_snapshot(vm, base["id"])  # a newer base exists now
    assert [sn["id"] for sn in await svc.list_snapshots(vm)] == [newer["id"]]


async def test_restore_survives_deleting_the_named_snapshot(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0, journal_keep=0)
    vm = await new_vm(svc)
    await svc.mutate(vm, "bump", {"by": 1})
    snap = await svc.create_snapshot(vm)
    await svc.mutate(vm, "bump", {"by": 2})
    await svc.restore_snapshot(vm, snap["id"])
    await svc.mutate(vm, "bump", {"by": 5})
    expected = await state(svc, vm)
    await svc.delete_snapshot(vm, snap["id"])
    await svc.gc()
    fresh = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)
    assert await state(fresh, vm) == expected


async def test_database_stays_bounded_over_a_long_run(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=20, journal_keep=10, retention_s=0)
    steady = await new_vm(svc, "steady")
    peaks: list[tuple[int, int, int]] = []
    for round_ in range(12):
        churn = await new_vm(svc, f"churn-{round_}")
        for i in range(30):
            await svc.mutate(steady, "bump", {"by": i})
            await svc.mutate(churn, "host_write", {"userspace_addr": i, "data": "ab" * 512})
        await svc.create_snapshot(churn)
        await svc.delete_vm(churn)
        await svc.wait_background()
        await svc.gc()
        peaks.append(_counts(svc))
    # 360 calls on `steady`, 12 VMs created and deleted: what is left is one VM, at most
    # `snapshot_every + journal_keep` records and its two automatic snapshots.
    vms, recs, snaps = peaks[-1]
    assert vms == 1 and recs <= 30 and snaps <= 2
    assert max(p[1] for p in peaks[3:]) <= 30


def _raw_insert_0002(url: str) -> None:
    engine = create_engine(sync_url(url))
    create_args = json.dumps({"vm_type": 0, "vcpus": 1, "paging_levels": 4, "name": "old"})
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO vms (id, name, tenant, vm_type, vcpus, paging_levels, create_args,"
                " summary, created_at, deleted, last_seq) VALUES ('vm-old', 'old', 'default',"
                " 0, 1, 4, :ca, '{}', CURRENT_TIMESTAMP, false, 2)"
            ),
            {"ca": create_args},
        )
        for seq, by in ((1, 3), (2, 4)):
            conn.execute(
                text(
                    "INSERT INTO journal (vm_id, seq, op, args, result, error, at, meta) VALUES"
                    " ('vm-old', :seq, 'bump', :args, NULL, NULL, CURRENT_TIMESTAMP, NULL)"
                ),
                {"seq": seq, "args": json.dumps({"by": by})},
            )
    engine.dispose()


async def test_migration_0003_upgrades_a_0002_database(
    db_url: str, make_service: ServiceFactory
) -> None:
    migrate(db_url, "0002")
    _raw_insert_0002(db_url)
    svc = await make_service(db_url, FAKE_ENGINE, snapshot_every=0)  # migrates to head
    counter, tag = await svc.read("vm-old", lambda vm: vm.state["counter"])
    assert (counter, tag) == (7, '"2"')
    snap = await svc.create_snapshot("vm-old", label="after upgrade")
    assert (await svc.get_snapshot("vm-old", snap["id"]))["label"] == "after upgrade"
    _, tag = await svc.mutate("vm-old", "bump", {"by": 1})
    assert tag == '"3"'


def test_vkmmu_gc_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.cli import main

    monkeypatch.setenv("VKMMU_DATABASE_URL", sqlite_url(tmp_path))
    assert main(["gc"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"fork_snapshots": 0, "vms_purged": 0, "rows_removed": 0, "records_pruned": 0}
