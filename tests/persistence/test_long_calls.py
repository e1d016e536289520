"""A long call on one VM never holds up the others, and a snapshot is made outside its VM's
lock. Checked by behaviour, not by time: the long call is held open at a gate while the
other calls run, and must still be running when they are answered."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

from app.engine import codec
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory

HVA = 0x7F00_0000_0000
MIB = 1 << 20
GATE_TIMEOUT_S = 60.0


def region(slot: int, size: int) -> dict[str, Any]:
    return {
        "slot": slot,
        "flags": 0,
        "guest_phys_addr": slot << 30,
        "memory_size": size,
        "userspace_addr": HVA + (slot << 30),
    }


async def new_vm(svc: VmService, name: str) -> str:
    info, _ = await svc.create_vm(name=name, vm_type=0, vcpus=1)
    await svc.mutate(info["id"], "set_user_memory_region", region(0, 64 * MIB))
    return str(info["id"])


def hold(svc: VmService, held: str, attr: str) -> tuple[threading.Event, threading.Event]:
    """Make the engine entry point `attr` (`apply` or `encode`) wait at a gate when it
    works for VM `held` (`apply`: its access calls); answers (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    port = svc.engine
    inner = getattr(port, attr)
    target: dict[str, Any] = {}

    def gated_apply(vm: Any, op: Any, at: Any, durations: Any) -> Any:
        if vm is target.get("vm") and op.name == "access":
            entered.set()
            assert release.wait(GATE_TIMEOUT_S)
        return inner(vm, op, at, durations)

    def gated_encode(copy: Any) -> bytes:
        entered.set()
        assert release.wait(GATE_TIMEOUT_S)
        return bytes(inner(copy))

    svc._engine = dataclasses.replace(
        port, **{attr: gated_apply if attr == "apply" else gated_encode}
    )
    target["vm"] = svc.loaded_vms()[held]
    return entered, release


async def test_a_long_call_does_not_hold_up_other_vms(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, snapshot_every=0)
    long_vm, other = await new_vm(svc, "long"), await new_vm(svc, "other")
    entered, release = hold(svc, long_vm, "apply")
    access = {"vcpu": 0, "gpa": 0, "size": 64 * MIB, "access": "write"}
    long_call = asyncio.create_task(svc.mutate(long_vm, "access", access))
    try:
        assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S)
        # The long call is inside the engine, in its worker thread: the event loop, the
        # database and every other VM are free.
        for slot in (1, 2):
            await svc.mutate(other, "set_user_memory_region", region(slot, 2 * MIB))
        await svc.mutate(other, "access", {**access, "size": 2 * MIB})
        got, _ = await svc.read(other, lambda vm: vm.info()["memslots"])
        assert got == 3
        assert not long_call.done()
    finally:
        release.set()
    result, tag = await long_call
    assert result["levels"]["4k"] + 512 * result["levels"]["2m"] == 64 * MIB // 4096
    assert tag == '"2"'


async def test_a_snapshot_is_made_outside_its_vm_lock(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, snapshot_every=0)
    vm_id = await new_vm(svc, "snap")
    await svc.mutate(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 4 * MIB, "access": "write"})
    before, _ = await svc.read(vm_id, codec.digest)
    entered, release = hold(svc, vm_id, "encode")
    snapshot = asyncio.create_task(svc.create_snapshot(vm_id))
    try:
        assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S)
        # The state is copied; its bytes are being made: the VM takes calls meanwhile.
        _, tag = await svc.mutate(vm_id, "set_user_memory_region", region(1, 2 * MIB))
        assert tag == '"3"'
        assert not snapshot.done()
    finally:
        release.set()
    info = await snapshot
    assert info["seq"] == 2  # the state when it was taken, not the later call's
    restored, _ = await svc.restore_snapshot(vm_id, info["id"])
    assert restored["version"] == 4
    after, _ = await svc.read(vm_id, codec.digest)
    assert after == before
