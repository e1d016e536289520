"""Replay (paged Core reads, no per-record answer work) rebuilds the very state the live calls
left: `codec.digest` of the replayed VM equals the live VM's, after single calls, a memslot
batch, and a catch-up of records another process appended."""

from __future__ import annotations

from typing import Any

from app.db import repository as repo
from app.engine import codec
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory
from tests.persistence.engine_workload import GIB, HVA, MIB, drive, region

BASE = 8 * GIB  # above the slots `drive` leaves


async def digest(svc: VmService, vm_id: str) -> str:
    value, _ = await svc.read(vm_id, codec.digest)
    return str(value)


def churn(first: int, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Slots created, some deleted again: every call journaled as its own record."""
    calls = []
    for i in range(first, first + n):
        calls.append(("set_user_memory_region", region(i, BASE + i * MIB, MIB, HVA + i * MIB)))
        if i % 3 == 0:
            calls.append(("set_user_memory_region", region(i, BASE + i * MIB, 0, HVA + i * MIB)))
    return calls


async def test_replay_gives_the_live_digest(
    db_url: str, make_service: ServiceFactory, monkeypatch: Any
) -> None:
    # Pages smaller than the journal: replay reads it in several queries.
    monkeypatch.setattr(repo, "REPLAY_PAGE", 7)
    svc = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    info, _ = await svc.create_vm(name="d", vm_type=0, vcpus=2)
    vm_id = info["id"]
    await drive(svc, vm_id)
    outcomes, _ = await svc.mutate_batch(vm_id, churn(10, 20))
    assert not any(isinstance(o, Exception) for o in outcomes)
    await svc.mutate(
        vm_id, "access", {"vcpu": 0, "gpa": BASE + 11 * MIB, "size": MIB, "access": "write"}
    )
    live = await digest(svc, vm_id)

    other = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    assert await digest(other, vm_id) == live  # creation + every record

    # `other` appends; `svc` catches up by replaying just those records.
    await other.mutate_batch(vm_id, churn(40, 9))
    after = await digest(other, vm_id)
    assert after != live
    assert await digest(svc, vm_id) == after
