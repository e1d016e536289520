"""GET /v1/vms/{vm}/trace: the kvmmmu tracepoints as trace-cmd report prints them."""

from __future__ import annotations

import re
from typing import Any

import httpx

from .helpers import assert_problem, ok, put_slot

MiB = 1 << 20
# `comm-pid [cpu] seconds.micros: event: text`, as trace-cmd report lays a line out.
LINE = re.compile(r"^\s*(\S.*?)-(\d+) \[(\d{3})\] (\d+\.\d{6}): (\w+):\s+(.*)$")


async def trace_text(client: httpx.AsyncClient, vm: str, **params: Any) -> list[str]:
    r = await client.get(f"/v1/vms/{vm}/trace", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers.get("etag")
    return r.text.splitlines()


async def test_a_slot_delete_shows_the_fast_zap_and_the_teardown(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "access": "write"}))
    lines = await trace_text(client, vm)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    events = [m.group(5) for m in parsed if m]
    assert events[0] == "kvm_mmu_spte_requested" and events[-1] == "kvm_mmu_set_spte"
    assert {m.group(1) for m in parsed if m} == {"CPU 0/KVM"}
    last = ok(await client.get(f"/v1/vms/{vm}/trace", params={"format": "json"}))["last_seq"]

    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    after = await trace_text(client, vm, after=last)
    head = LINE.match(after[0])
    assert head and head.group(5, 6) == ("kvm_mmu_zap_all_fast", "kvm-mmu-valid-gen 0 used_pages 0")
    assert after[0].lstrip().startswith("vmm-")
    changed = [line for line in after if ": kvm_tdp_mmu_spte_changed: " in line]
    assert "as id 0 gfn 0 level 3 old_spte " in changed[0]
    assert changed[0].endswith("new_spte 8000000000000000")
    assert any(line.endswith("new_spte 80000000000005a0") for line in changed)


async def test_json_records_filters_and_limits(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    body = {"gpa": 0, "size": 3 * 4096, "access": "read"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=body))
    log = ok(await client.get(f"/v1/vms/{vm}/trace", params={"format": "json"}))
    assert log["capacity"] == 4096 and log["oldest_seq"] == 1
    recs = log["records"]
    assert [r["seq"] for r in recs] == list(range(1, log["last_seq"] + 1))
    assert all(r["at"].endswith("Z") and r["cpu"] == 0 for r in recs)
    only = ok(
        await client.get(
            f"/v1/vms/{vm}/trace",
            params={"format": "json", "events": "kvm_mmu_set_spte", "limit": 2},
        )
    )["records"]
    assert [r["event"] for r in only] == ["kvm_mmu_set_spte"] * 2
    assert [r["text"].split()[1] for r in only] == ["1", "2"]  # the newest two: gfn 1 and 2
    # TDP faults map writable whenever the host page is (ACC_ALL), read faults included.
    assert "(rwx) level 1" in only[0]["text"]


async def test_bad_queries_are_problems(client: httpx.AsyncClient, vm: str) -> None:
    r = await client.get(f"/v1/vms/{vm}/trace", params={"events": "kvm_exit"})
    (err,) = assert_problem(r, 422)["errors"]
    assert tuple(err["loc"]) == ("query", "events")
    assert "kvm_exit" in err["msg"] and "kvm_tdp_mmu_spte_changed" in err["msg"]
    assert_problem(await client.get(f"/v1/vms/{vm}/trace", params={"format": "xml"}), 422)
    assert_problem(await client.get(f"/v1/vms/{vm}/trace", params={"after": -1}), 422)
    assert_problem(await client.get("/v1/vms/nope/trace"), 404)


async def test_a_zero_capacity_turns_tracing_off(make_client: Any) -> None:
    from app.services.vms import VmService

    c = await make_client()
    svc = c.app.state.service
    assert isinstance(svc, VmService)
    svc.trace_records = 0
    vm = ok(await c.post("/v1/vms", json={}), 201)["id"]
    ok(await put_slot(c, vm, 0, gpa=0, size=4 * MiB))
    ok(await c.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0}))
    assert await trace_text(c, vm) == []
    log = ok(await c.get(f"/v1/vms/{vm}/trace", params={"format": "json"}))
    assert log == {"records": [], "last_seq": 0, "oldest_seq": 0, "capacity": 0}
