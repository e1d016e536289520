"""Required means required: no body field whose absence would delete or zero something has a
default, and unknown query parameters are refused like unknown body fields."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.api.helpers import HVA, MiB, assert_problem, ok, put_slot, state

# Every optional request-body field with the reason its default takes nothing away. A new
# optional field fails the test until its default is reviewed here.
SAFE_DEFAULTS: dict[str, dict[str, str]] = {
    "SnapshotCreate": {"label": "a name only"},
    "TokenCreate": {
        "scopes": "read and write, as the admin intended by leaving it out",
        "expires_at": "no expiry; revocable by id",
        "label": "a name only",
    },
    "WhatIfRequest": {
        # Exactly one of ops/trace is required, checked by the model (422 naming both).
        "ops": "one of ops or trace; a what-if never changes the VM",
        "trace": "one of ops or trace; a what-if never changes the VM",
        "touch": "none: the guest does nothing between the operations",
        "costs": "the documented defaults of docs/cost-model.md",
    },
    "VmCreate": {
        "name": "a label only",
        "vm_type": "0 = KVM_X86_DEFAULT_VM: what KVM_CREATE_VM(0) creates",
        "vcpus": "creation: 1 vCPU",
        "paging_levels": "creation: 4-level TDP",
        "from_snapshot": "creation without a fork",
        "td_lifecycle": "a TD runnable at creation, as before the lifecycle existed",
        "host": "the service's host profile (VKMMU_HOST_*)",
    },
    "MemoryRegion": {
        "slot": "only repeats the path",
        "flags": "0 = no KVM_MEM_* flag (the struct's zero value; not a removal)",
        "guest_memfd": "ignored without KVM_MEM_GUEST_MEMFD",
        "guest_memfd_offset": "ignored without KVM_MEM_GUEST_MEMFD",
    },
    "EnableCap": {"flags": "must be 0 for every cap vkmmu models"},
    "SetAttributes": {"flags": "must be 0 (KVM_SET_MEMORY_ATTRIBUTES has no flags yet)"},
    "Access": {
        "size": "one page",
        "access": "a read changes no data",
        "private": "a check, not a switch",
    },
    "Load": {"private": "a check, not a switch"},
    "Store": {"private": "a check, not a switch"},
    "PreFault": {"flags": "must be 0"},
    "Accept": {"size": "one page"},
    "TdxInitVm": {
        "gpaw": "the VM's own EPT level decides (48 for 4-level, 52 for 5-level)",
        "flags": "must be 0",
    },
    "TdxInitVcpu": {"rcx": "the struct's zero value", "flags": "must be 0"},
    "TdxInitMemRegion": {"flags": "0 = add without measuring"},
    "NxRecoverRequest": {"ratio": "the kernel's default ratio (60)"},
    "HostProfileIn": {
        "enable_pml": "the service's VKMMU_HOST_ENABLE_PML",
        "eager_page_split": "the service's VKMMU_HOST_EAGER_PAGE_SPLIT",
        "nx_huge_pages": "the service's VKMMU_HOST_NX_HUGE_PAGES",
        "tdp_mmu": "the service's VKMMU_HOST_TDP_MMU",
    },
    "HypercallComplete": {"ret": "0 = the VMM converted the chunk (what KVM leaves there)"},
    "Hypercall": {
        "a0": "register left 0: a MAP_GPA_RANGE at GPA 0",
        "a1": "register left 0: no pages, so MAP_GPA_RANGE answers -KVM_EINVAL",
        "a2": "register left 0: convert to shared, the harmless direction",
        "a3": "RSI, unused by MAP_GPA_RANGE",
        "long_mode": "a 64-bit guest, as every modern VMM runs",
        "cpl": "the guest kernel (CPL 0) makes the call",
    },
    "GmemCreate": {"flags": "a plain guest_memfd"},
    "DirtyLogClear": {"first_page": "the slot's first page; what is cleared is `bitmap`"},
    "ZapRequest": {
        "gpa": "only for scope range, where it is required",
        "size": "only for scope range, where it is required",
    },
}

# Fields whose zero value destroys state: each must be required wherever it appears.
DESTRUCTIVE = {"memory_size", "attributes", "args", "scope", "roots", "policy", "smm"}


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        return _resolve(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[1]])
    return schema


def request_bodies() -> list[tuple[str, str, str, dict[str, Any]]]:
    spec = create_app().openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody")
            if not body:
                continue
            schema = body["content"].get("application/json", {}).get("schema", {})
            # An optional body is `anyOf: [model, null]`; a text body (a trace) has no fields.
            refs = (
                [schema]
                if "$ref" in schema
                else [s for s in schema.get("anyOf", ()) if "$ref" in s]
            )
            if not refs:
                continue
            ref = refs[0]["$ref"]
            name = ref.rsplit("/", 1)[1]
            out.append((method, path, name, _resolve(spec, {"$ref": ref})))
    return out


def test_every_optional_body_field_is_reviewed() -> None:
    seen = set()
    for method, path, name, schema in request_bodies():
        seen.add(name)
        required = set(schema.get("required", ()))
        for field in schema["properties"]:
            where = f"{method.upper()} {path}: {name}.{field}"
            if field in DESTRUCTIVE:
                assert field in required, f"{where} must be required"
            elif field not in required:
                assert field in SAFE_DEFAULTS.get(name, {}), f"{where}: review its default"
        assert schema.get("additionalProperties") is False, f"{name} must refuse unknown fields"
    assert seen >= {"MemoryRegion", "SetAttributes", "EnableCap"}


async def test_memslot_put_with_empty_body_is_422_naming_fields(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    before = await state(client, vm)
    for body in ({}, {"guest_phys_addr": 0}, {"guest_phys_addr": 0, "userspace_addr": HVA}):
        prob = assert_problem(await client.put(f"/v1/vms/{vm}/memslots/0", json=body), 422)
        missing = {tuple(e["loc"]) for e in prob["errors"] if e["type"] == "missing"}
        want = {("body", f) for f in ("guest_phys_addr", "memory_size", "userspace_addr")}
        assert missing == want - {("body", f) for f in body}
        for field in missing:
            assert field[1] in prob["detail"]
    assert await state(client, vm) == before


async def test_only_required_fields_delete_nothing(client: httpx.AsyncClient, vm: str) -> None:
    """Each body that could take something away, sent with only its required fields and the
    values already in force, changes nothing."""
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    mask = 1 << 7  # SLOT_ZAP_ALL disabled
    cap = {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [mask]}
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap))
    before = await state(client, vm)
    same = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}
    r = ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=same))
    assert r["change"] == "none" and r["memslot"]["memory_size"] == 2 * MiB
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap))
    after = await state(client, vm)
    # Unchanged calls keep the state but move the version: compare everything else.
    assert {k: v for k, v in after.items() if k != "etag"} == {
        k: v for k, v in before.items() if k != "etag"
    }
    assert_problem(await client.post(f"/v1/vms/{vm}/enable-cap", json={"cap": cap["cap"]}), 422)


async def test_explicit_zero_size_still_deletes(client: httpx.AsyncClient, vm: str) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    body = {"guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0}
    r = ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=body))
    assert r["change"] == "delete" and r["memslot"] is None
    assert ok(await client.get(f"/v1/vms/{vm}/memslots"))["items"] == []


async def test_attributes_need_the_attributes(client: httpx.AsyncClient) -> None:
    vm = ok(await client.post("/v1/vms", json={"vm_type": "KVM_X86_SW_PROTECTED_VM"}), 201)["id"]
    url = f"/v1/vms/{vm}/memory-attributes"
    ok(await client.post(url, json={"address": 0, "size": MiB, "attributes": 8}))
    prob = assert_problem(await client.post(url, json={"address": 0, "size": MiB}), 422)
    assert [e["loc"] for e in prob["errors"]] == [["body", "attributes"]]
    assert ok(await client.get(url))["items"] == [{"address": 0, "size": MiB, "attributes": 8}]


@pytest.mark.parametrize(
    "path,params",
    [
        ("/v1/vms", {"limt": "5"}),
        ("/v1/vms/{vm}", {"verbose": "1"}),
        ("/v1/vms/{vm}/memslots", {"limit": "5", "cursr": "1"}),
        ("/v1/vms/{vm}/translate", {"gpa": "0", "root": "1"}),
        ("/v1/capabilities", {"x": "1"}),
    ],
)
async def test_unknown_query_parameter_is_422(
    client: httpx.AsyncClient, vm: str, path: str, params: dict[str, str]
) -> None:
    prob = assert_problem(await client.get(path.format(vm=vm), params=params), 422)
    known = {"limit", "cursor", "gpa"}
    bad = [e["loc"] for e in prob["errors"] if e["type"] == "extra_forbidden"]
    assert bad == [["query", k] for k in sorted(params) if k not in known]
    assert all(f"query.{loc[1]}" in prob["detail"] for loc in bad)


async def test_known_query_parameters_still_work(client: httpx.AsyncClient, vm: str) -> None:
    ok(await client.get(f"/v1/vms/{vm}/memslots", params={"limit": 5}))
    ok(await client.get("/v1/vms", params={"limit": 5}))
