"""Read-only views (translate, mappings, roots, stats, audit), zaps, snapshots and /metrics."""

from __future__ import annotations

import errno

import httpx
import pytest

from .helpers import HVA, MiB, assert_errno, assert_problem, etag, new_vm, ok, put_slot, state


@pytest.fixture
async def mapped(client: httpx.AsyncClient, vm: str) -> str:
    """Slot 0 (1 MiB at GPA 0) with its first 4 pages mapped."""
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4 * 4096}))
    return vm


async def test_reads_do_not_change_the_version(client: httpx.AsyncClient, mapped: str) -> None:
    vm = mapped
    v = etag(await client.get(f"/v1/vms/{vm}"))
    for path in ("translate?gpa=0x1000", "mappings", "roots", "stats", "audit", "memslots"):
        r = await client.get(f"/v1/vms/{vm}/{path}")
        assert r.status_code == 200, (path, r.text)
        assert etag(r) == v
    assert etag(await client.get(f"/v1/vms/{vm}")) == v


async def test_translate(client: httpx.AsyncClient, mapped: str) -> None:
    t = ok(await client.get(f"/v1/vms/{mapped}/translate", params={"gpa": "0x1000"}))
    assert t["gpa"] == 0x1000
    walk = t["roots"][0]["walk"]
    assert [e["level"] for e in walk] == [4, 3, 2, 1]
    leaf = walk[-1]
    assert leaf["leaf"] is True and leaf["present"] is True
    # Raw SPTEs are hex strings: a u64 does not fit a JSON double.
    assert all(isinstance(e["raw"], str) and e["raw"].startswith("0x") for e in walk)
    assert_problem(await client.get(f"/v1/vms/{mapped}/translate", params={"gpa": "-1"}), 422)
    assert_problem(await client.get(f"/v1/vms/{mapped}/translate", params={"gpa": str(2**64)}), 422)


async def test_mappings_paginated(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    # Three separate runs: pages 0, 2 and 4.
    for gpa in (0, 2 * 4096, 4 * 4096):
        ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": gpa}))
    full = ok(await client.get(f"/v1/vms/{vm}/mappings"))["items"]
    assert len(full) == 3
    got = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = ok(await client.get(f"/v1/vms/{vm}/mappings", params=params))
        got += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == full


async def test_mappings_cursor_is_a_position(client: httpx.AsyncClient, vm: str) -> None:
    """The cursor names where the next page begins (`<root>:<position>`): a malformed one,
    or an index as older builds gave, is a 422 naming it."""
    ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    for gpa in (0, 2 * 4096):
        ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": gpa}))
    page = ok(await client.get(f"/v1/vms/{vm}/mappings", params={"limit": 1}))
    first = page["items"][0]
    assert page["next_cursor"] == f"{first['root']}:{first['position'] + first['npages']}"
    rest = ok(await client.get(f"/v1/vms/{vm}/mappings", params={"cursor": page["next_cursor"]}))
    assert [m["position"] for m in rest["items"]] == [2] and rest["next_cursor"] is None
    for bad in ("1", "x:1", "1:", "1:2:3", "-1:0"):
        r = await client.get(f"/v1/vms/{vm}/mappings", params={"cursor": bad})
        assert_problem(r, 422)
        assert "cursor" in r.text


async def test_roots_stats_audit(client: httpx.AsyncClient, mapped: str) -> None:
    roots = ok(await client.get(f"/v1/vms/{mapped}/roots"))["items"]
    assert roots[0]["role"] == "direct" and roots[0]["valid"] is True
    stats = ok(await client.get(f"/v1/vms/{mapped}/stats"))
    assert stats["pages_4k"] == 4
    counters = ("remote_tlb_flush", "refaults", "zaps_all_fast", "zaps_slot_leafs")
    assert {k: stats[k] for k in counters} == dict.fromkeys(counters, 0)
    audit = ok(await client.get(f"/v1/vms/{mapped}/audit"))
    assert audit["ok"] is True and audit["violations"] == []


async def test_counters_after_a_known_workload(client: httpx.AsyncClient, mapped: str) -> None:
    """Each counter moves by exactly what the workload implies (vCPU 0 is in the guest since
    its first access, so a flush that has to happen sends an IPI)."""
    vm = mapped
    zap = {"scope": "range", "gpa": 0, "size": 2 * 4096, "roots": "both"}
    # 1. Two of the four pages zapped: one kvm_flush_remote_tlbs, with an IPI.
    ok(await client.post(f"/v1/vms/{vm}/zaps", json=zap))
    # 2. The four pages again: the two zapped ones refault, the other two are still mapped.
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4 * 4096}))
    # 3. A slot deleted on a default VM with SLOT_ZAP_ALL: kvm_mmu_zap_all_fast, which flushes
    #    nothing (each vCPU flushes when it loads its new root).
    ok(await put_slot(client, vm, 1, gpa=4 * MiB, size=MiB, hva=HVA + 4 * MiB))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/1"))
    # 4. The quirk disabled, a mapped slot deleted: only its leaves (kvm-memslots.md §4.1),
    #    with a flush since a valid root lost leaves.
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4096}))
    cap = {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [1 << 7]}  # KVM_X86_QUIRK_SLOT_ZAP_ALL
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    stats = ok(await client.get(f"/v1/vms/{vm}/stats"))
    counters = ("remote_tlb_flush", "refaults", "zaps_all_fast", "zaps_slot_leafs")
    assert {k: stats[k] for k in counters} == {
        "remote_tlb_flush": 2,  # steps 1 and 4
        "refaults": 3,  # pages 0 and 1 after step 1, page 0 after the zap of step 3
        "zaps_all_fast": 1,
        "zaps_slot_leafs": 1,
    }


async def test_explicit_zaps_and_events(client: httpx.AsyncClient, mapped: str) -> None:
    vm = mapped
    z = ok(
        await client.post(
            f"/v1/vms/{vm}/zaps",
            json={"scope": "range", "gpa": 0, "size": "0x2000", "roots": "both"},
        )
    )
    assert z["cause"] == "explicit"
    assert z["sptes_zapped_total"] == 2
    z2 = ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))
    assert z2["path"] == "zap_all_fast"
    events = ok(await client.get(f"/v1/vms/{vm}/zaps"))["items"]
    assert [e["seq"] for e in events] == [z2["seq"], z["seq"]]  # newest first
    page = ok(await client.get(f"/v1/vms/{vm}/zaps", params={"limit": 1}))
    assert [e["seq"] for e in page["items"]] == [z2["seq"]]
    rest = ok(await client.get(f"/v1/vms/{vm}/zaps", params={"cursor": page["next_cursor"]}))
    assert [e["seq"] for e in rest["items"]] == [z["seq"]]
    before = await state(client, vm)
    bad = {"scope": "range", "gpa": 1, "size": 4096, "roots": "both"}
    assert_errno(await client.post(f"/v1/vms/{vm}/zaps", json=bad), errno.EINVAL)
    assert_problem(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "some"}), 422)
    assert await state(client, vm) == before


async def test_snapshot_restore_and_fork(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    stored = await client.post(f"/v1/vms/{vm}/vcpus/0/store", json={"gpa": 0, "data": "aa"})
    taken = await client.post(f"/v1/vms/{vm}/snapshots")
    snap = ok(taken, 201)
    # A snapshot moves no version: its ETag is the version it captured.
    assert etag(taken) == etag(stored) == f'"{snap["seq"]}"'
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/store", json={"gpa": 0, "data": "bb"}))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    listed = ok(await client.get(f"/v1/vms/{vm}/snapshots"))["items"]
    assert snap["id"] in [s["id"] for s in listed]

    fork = ok(await client.post("/v1/vms", json={"from_snapshot": snap["id"]}), 201)["id"]
    data = ok(await client.post(f"/v1/vms/{fork}/vcpus/0/load", json={"gpa": 0, "len": 1}))
    assert data == {"data": "aa", "exit": None}

    r = await client.post(f"/v1/vms/{vm}/snapshots/{snap['id']}/restore")
    ok(r)
    assert etag(r)
    assert [m["slot"] for m in ok(await client.get(f"/v1/vms/{vm}/memslots"))["items"]] == [0]
    data = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 0, "len": 1}))
    assert data == {"data": "aa", "exit": None}

    assert_problem(await client.post(f"/v1/vms/{vm}/snapshots/snap-nope/restore"), 404)
    assert_problem(await client.post("/v1/vms", json={"from_snapshot": "snap-nope"}), 404)


async def test_metrics_label_loaded_vms(client: httpx.AsyncClient, mapped: str) -> None:
    other = await new_vm(client)
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert f'vkmmu_vm_pages_4k{{vm="{mapped}"}} 4.0' in text
    assert f'vkmmu_vm_pages_4k{{vm="{other}"}} 0.0' in text
    assert "vkmmu_vms_loaded 2.0" in text


async def test_mappings_of_one_root(client: httpx.AsyncClient, mapped: str) -> None:
    root = ok(await client.get(f"/v1/vms/{mapped}/roots"))["items"][0]["id"]
    mine = ok(await client.get(f"/v1/vms/{mapped}/mappings", params={"root": root}))["items"]
    assert mine == ok(await client.get(f"/v1/vms/{mapped}/mappings"))["items"]
    none = ok(await client.get(f"/v1/vms/{mapped}/mappings", params={"root": root + 1000}))
    assert none["items"] == []
    assert_problem(await client.get(f"/v1/vms/{mapped}/mappings", params={"root": "x"}), 422)


async def test_range_zap_needs_gpa_and_size(client: httpx.AsyncClient, mapped: str) -> None:
    vm = mapped
    before = await state(client, vm)
    for body, missing in (
        ({"scope": "range", "roots": "shared"}, {"gpa", "size"}),
        ({"scope": "range", "gpa": 0, "roots": "shared"}, {"size"}),
        ({"scope": "range", "size": 4096, "gpa": None, "roots": "shared"}, {"gpa"}),
    ):
        problem = assert_problem(await client.post(f"/v1/vms/{vm}/zaps", json=body), 422)
        assert "errno" not in problem
        assert {tuple(e["loc"]) for e in problem["errors"]} == {("body", f) for f in missing}
    assert await state(client, vm) == before
    # `all` needs neither.
    z = ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))
    assert z["path"] == "zap_all_fast"


async def test_fork_takes_its_kind_of_vm_from_the_snapshot(client: httpx.AsyncClient) -> None:
    src = await new_vm(client, vcpus=2, paging_levels=5)
    snap = ok(await client.post(f"/v1/vms/{src}/snapshots"), 201)
    for body, fields in (
        ({"vcpus": 1}, {"vcpus"}),
        ({"vm_type": "KVM_X86_TDX_VM", "paging_levels": 4}, {"vm_type", "paging_levels"}),
    ):
        r = await client.post("/v1/vms", json={"from_snapshot": snap["id"], **body})
        problem = assert_problem(r, 422)
        assert {tuple(e["loc"]) for e in problem["errors"]} == {("body", f) for f in fields}
        assert "snapshot" in problem["detail"]
    assert [v["id"] for v in ok(await client.get("/v1/vms"))["items"]] == [src]
    # The same values, or none, fork.
    same = {"from_snapshot": snap["id"], "vm_type": 0, "vcpus": 2, "paging_levels": 5}
    fork = ok(await client.post("/v1/vms", json=same), 201)
    assert (fork["vcpus"], fork["paging_levels"]) == (2, 5)
    ok(await client.post("/v1/vms", json={"from_snapshot": snap["id"]}), 201)
    # The snapshots of a deleted VM are gone with it: 404, as for their list.
    ok(await client.delete(f"/v1/vms/{src}"))
    assert_problem(await client.get(f"/v1/vms/{src}/snapshots"), 404)
    assert_problem(await client.post("/v1/vms", json={"from_snapshot": snap["id"]}), 404)
