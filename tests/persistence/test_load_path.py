"""Loading a VM. Replay parses a record's operation once per distinct (name, args text):
records that repeat (a VMM setting the same memslot over and over) share one frozen operation;
operations with a mutable field, and args a driver hands decoded, are parsed each time. The
replayed state is the live one either way. A started service has compiled every statement
the load runs, so the first request after a restart does not compile them."""

from __future__ import annotations

import errno
import json

import pytest
from sqlalchemy import event
from sqlalchemy.engine.default import CACHE_HIT

from app.engine import KvmError, codec, ops
from app.services.vms import VmService, _ParsedOps
from tests.persistence.conftest import ServiceFactory
from tests.persistence.engine_workload import HVA, MIB, region

VGA = 0xA0000


def test_the_same_text_gives_the_same_frozen_operation() -> None:
    parsed = _ParsedOps(ops.parse)
    text = json.dumps(region(2, VGA, 0x20000, HVA))
    first = parsed.parse("set_user_memory_region", text)
    assert parsed.parse("set_user_memory_region", text) is first
    assert parsed.parse("set_user_memory_region", json.loads(text)) == first  # decoded args
    cap = json.dumps({"cap": "KVM_CAP_DISABLE_QUIRKS2", "flags": 0, "args": [128, 0, 0, 0]})
    a, b = parsed.parse("enable_cap", cap), parsed.parse("enable_cap", cap)
    assert a == b and a is not b  # its list is its own
    for _ in range(2):  # a record that does not parse fails every time
        with pytest.raises(KvmError) as e:
            parsed.parse("set_user_memory_region", '{"nope": 1}')
        assert e.value.errno == errno.EINVAL


def test_forgetting_past_the_bound_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ParsedOps, "KEEP", 3)
    parsed = _ParsedOps(ops.parse)
    texts = [json.dumps(region(i, i * MIB, MIB, HVA)) for i in range(10)]
    for t in texts + texts:
        assert parsed.parse("set_user_memory_region", t) == ops.parse(
            "set_user_memory_region", json.loads(t)
        )


async def test_a_journal_of_repeated_records_replays_to_the_live_digest(
    db_url: str, make_service: ServiceFactory
) -> None:
    svc = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    info, _ = await svc.create_vm(name="vga", vm_type=0, vcpus=1)
    vm_id = info["id"]
    calls = [("set_user_memory_region", region(0, 0, VGA, HVA))]
    for i in range(40):  # the VGA window created and deleted, each delete a zap
        calls.append(("set_user_memory_region", region(2, VGA, 0x20000 if i % 2 == 0 else 0, HVA)))
        calls.append(("access", {"vcpu": 0, "gpa": 0, "size": VGA, "access": "read"}))
    outcomes, _ = await svc.mutate_batch(vm_id, calls)
    assert not any(isinstance(o, Exception) for o in outcomes)
    live, _ = await svc.read(vm_id, codec.digest)
    other: VmService = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    replayed, _ = await other.read(vm_id, codec.digest)
    assert replayed == live


async def test_a_started_service_loads_a_vm_with_statements_compiled_at_start(
    db_url: str, make_service: ServiceFactory
) -> None:
    first = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    info, _ = await first.create_vm(name="warm", vm_type=0, vcpus=1)
    await first.mutate(info["id"], "set_user_memory_region", region(0, 0, MIB, HVA))
    restarted = await make_service(db_url, snapshot_every=0, snapshot_work_bytes=0)
    compiled: list[str] = []  # SQLAlchemy statements not found in the compiled cache

    def seen(
        conn: object, cursor: object, sql: str, params: object, context: object, many: bool
    ) -> None:
        hit = getattr(context, "cache_hit", None)
        if getattr(context, "compiled", None) is not None and hit is not CACHE_HIT:
            compiled.append(sql)

    engine = restarted.db._read_engine
    event.listen(engine, "after_cursor_execute", seen)
    try:
        slots, _ = await restarted.read(info["id"], lambda vm: len(vm.memslots()))
    finally:
        event.remove(engine, "after_cursor_execute", seen)
    assert slots == 1  # loaded: creation and the record replayed
    assert compiled == []
