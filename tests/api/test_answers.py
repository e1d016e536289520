"""Every answer is a complete model: declared field by field, times in RFC 3339."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.engine.stat_descriptors import BY_NAME, DESCRIPTORS
from app.engine.stats import is_cumulative
from app.main import create_app
from tests.api.helpers import HVA, MiB, ok, put_slot

# Routes whose answers belong to the snapshot and health modules, typed there: not models yet.


def _schemas_of(spec: dict[str, Any], node: Any, seen: set[str]) -> list[tuple[str, Any]]:
    """Every (name, schema) reachable from `node`."""
    out: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                schema = spec["components"]["schemas"][name]
                out.append((name, schema))
                out += _schemas_of(spec, schema, seen)
        for v in node.values():
            out += _schemas_of(spec, v, seen)
    elif isinstance(node, list):
        for v in node:
            out += _schemas_of(spec, v, seen)
    return out


def test_no_response_schema_is_open() -> None:
    spec = create_app().openapi()
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if not status.startswith("2"):
                    continue
                content = resp.get("content", {}).get("application/json")
                if content is None:
                    continue
                schema = content["schema"]
                assert schema.get("$ref"), f"{method} {path}: an inline (untyped) answer"
                for name, s in _schemas_of(spec, schema, set()):
                    where = f"{method.upper()} {path} -> {name}"
                    assert s.get("additionalProperties") is not True, where
                    if s.get("type") == "object":
                        assert s.get("properties"), f"{where}: an object without fields"
                        assert s.get("additionalProperties") is False, where
                    checked += 1
    assert checked > 50


def test_stat_descriptors_cover_every_stat_and_agree_on_kinds() -> None:
    for d in DESCRIPTORS:
        assert (d.kind == "cumulative") == is_cumulative(d.name), d.name
    assert BY_NAME["pages_4k"].kind == "instant"
    assert BY_NAME["max_mmu_rmap_size"].kind == "peak"
    assert BY_NAME["remote_tlb_flush"].kind == "cumulative"


async def test_stats_are_typed_and_described(client: httpx.AsyncClient, vm: str) -> None:
    stats = ok(await client.get(f"/v1/vms/{vm}/stats"))
    desc = ok(await client.get("/v1/stats/descriptors"))["items"]
    names = [d["name"] for d in desc]
    assert len(names) == len(set(names))
    # A default VM: every stat but the TD-only ones, each described.
    assert set(stats) == {d["name"] for d in desc if not d["tdx_only"]}
    assert all(isinstance(v, int) for v in stats.values())
    td = ok(await client.post("/v1/vms", json={"vm_type": "KVM_X86_TDX_VM"}), 201)["id"]
    assert set(ok(await client.get(f"/v1/vms/{td}/stats"))) == set(names)
    spec = create_app().openapi()["components"]["schemas"]["Stats"]["properties"]
    assert set(spec) == set(names) and all(spec[n].get("description") for n in names)


async def test_enable_cap_answers_state_after(client: httpx.AsyncClient, vm: str) -> None:
    body = {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [["KVM_X86_QUIRK_SLOT_ZAP_ALL"]]}
    r = ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=body))
    zap_all = next(q for q in r["quirks"]["quirks"] if q["name"] == "KVM_X86_QUIRK_SLOT_ZAP_ALL")
    assert zap_all["enabled"] is False
    body = {"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [3]}
    r = ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=body))
    assert r["manual_dirty_log_protect"] == 3
    assert r["manual_dirty_log_protect_names"] == [
        "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
        "KVM_DIRTY_LOG_INITIALLY_SET",
    ]


async def test_translate_names_the_hva(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0x3000}))
    walk = ok(await client.get(f"/v1/vms/{vm}/translate", params={"gpa": 0x3123}))
    leaf = walk["roots"][0]["leaf"]
    assert leaf["backing"] == "host_memory"
    assert leaf["hva"] == HVA + 0x3123
    assert leaf["guest_memfd"] is None and "hpa" not in leaf


async def test_translate_names_the_guest_memfd_page(client: httpx.AsyncClient) -> None:
    td = ok(await client.post("/v1/vms", json={"vm_type": "KVM_X86_TDX_VM"}), 201)["id"]
    fd = ok(await client.post(f"/v1/vms/{td}/guest-memfds", json={"size": 2 * MiB}), 201)["fd"]
    region = {"flags": ["KVM_MEM_GUEST_MEMFD"], "guest_memfd": fd, "guest_memfd_offset": 0}
    ok(await put_slot(client, td, 0, gpa=0, size=2 * MiB, **region))
    attrs = {"address": 0, "size": 2 * MiB, "attributes": ["KVM_MEMORY_ATTRIBUTE_PRIVATE"]}
    ok(await client.post(f"/v1/vms/{td}/memory-attributes", json=attrs))
    ok(await client.post(f"/v1/vms/{td}/vcpus/0/accept", json={"gpa": 0x5000}))
    walk = ok(await client.get(f"/v1/vms/{td}/translate", params={"gpa": 0x5010}))
    (mirror,) = [r for r in walk["roots"] if r["role"] == "mirror"]
    leaf = mirror["leaf"]
    assert leaf["backing"] == "guest_memfd" and leaf["hva"] is None
    assert (leaf["guest_memfd"], leaf["guest_memfd_offset"]) == (fd, 0x5010)


async def _zaps(client: httpx.AsyncClient, vm: str, **params: Any) -> list[dict[str, Any]]:
    return ok(await client.get(f"/v1/vms/{vm}/zaps", params=params))["items"]  # type: ignore[no-any-return]


async def test_zap_list_filters(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 8192}))
    ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))
    discard = {"userspace_addr": HVA, "len": 4096}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0}))
    ok(await client.post(f"/v1/vms/{vm}/host-memory/discard", json=discard))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    every = await _zaps(client, vm)
    assert [e["cause"] for e in every] == ["memslot_delete", "mmu_notifier", "explicit"]
    for e in every:
        at = datetime.fromisoformat(e["at"])
        assert at.tzinfo is not None and e["at"].endswith("Z")
    assert [e["cause"] for e in await _zaps(client, vm, cause="explicit")] == ["explicit"]
    paths = [e["path"] for e in await _zaps(client, vm, path="zap_all_fast")]
    assert paths == ["zap_all_fast", "zap_all_fast"]
    assert await _zaps(client, vm, cause="explicit", path="zap_gfn_range") == []
    newest = datetime.fromisoformat(every[0]["at"])
    assert [e["seq"] for e in await _zaps(client, vm, since=every[0]["at"])] == [every[0]["seq"]]
    later = (newest + timedelta(seconds=1)).isoformat()
    assert await _zaps(client, vm, since=later) == []
    naive = (newest - timedelta(days=1)).astimezone(UTC).replace(tzinfo=None).isoformat()
    assert len(await _zaps(client, vm, since=naive)) == 3
    r = await client.get(f"/v1/vms/{vm}/zaps", params={"since": "yesterday"})
    assert r.status_code == 422
    # Filters and pagination together: the cursor walks the filtered list.
    page = ok(await client.get(f"/v1/vms/{vm}/zaps", params={"path": "zap_all_fast", "limit": 1}))
    assert page["next_cursor"] == str(page["items"][0]["seq"])


async def test_times_are_rfc3339(client: httpx.AsyncClient, vm: str) -> None:
    info = ok(await client.get(f"/v1/vms/{vm}"))
    assert datetime.fromisoformat(info["created_at"]).tzinfo is not None
    zap = ok(await client.delete(f"/v1/vms/{vm}"))
    assert datetime.fromisoformat(zap["at"]).tzinfo is not None
