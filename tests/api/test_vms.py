"""VMs, vCPUs, per-VM capabilities, KVM_ENABLE_CAP and quirks over HTTP."""

from __future__ import annotations

import errno

import httpx
import pytest

from app.engine import uapi

from .helpers import assert_errno, assert_problem, etag, new_vm, ok, state

SLOT_ZAP_ALL = int(uapi.Quirk.KVM_X86_QUIRK_SLOT_ZAP_ALL)
# Disabled from the start on the simulated Intel host (an AMD-only quirk): 0x2.
CD_NW_CLEARED = int(uapi.Quirk.KVM_X86_QUIRK_CD_NW_CLEARED)


async def test_create_vm_defaults(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/vms", json={})
    info = ok(r, 201)
    assert info["vm_type"] == 0
    assert info["vcpus"] == 1
    assert info["paging_levels"] == 4
    assert r.headers["location"] == f"/v1/vms/{info['id']}"
    assert etag(r)
    got = await client.get(f"/v1/vms/{info['id']}")
    assert ok(got)["id"] == info["id"]
    assert etag(got) == etag(r)


@pytest.mark.parametrize(
    ("vm_type", "number"),
    [
        ("KVM_X86_TDX_VM", 5),
        (5, 5),
        ("0x1", 1),
        ("KVM_X86_SW_PROTECTED_VM", 1),
        ("0", 0),
    ],
)
async def test_vm_type_by_name_or_number(
    client: httpx.AsyncClient, vm_type: object, number: int
) -> None:
    info = ok(await client.post("/v1/vms", json={"vm_type": vm_type, "vcpus": "0x2"}), 201)
    assert info["vm_type"] == number
    assert info["vcpus"] == 2


@pytest.mark.parametrize("vm_type", ["KVM_X86_SEV_VM", "KVM_X86_SNP_VM", 3, 31, 2**40])
async def test_unsupported_vm_type_is_einval_and_creates_nothing(
    client: httpx.AsyncClient, vm_type: object
) -> None:
    assert_errno(await client.post("/v1/vms", json={"vm_type": vm_type}), errno.EINVAL)
    assert ok(await client.get("/v1/vms"))["items"] == []


async def test_bad_paging_levels_is_einval(client: httpx.AsyncClient) -> None:
    assert_errno(await client.post("/v1/vms", json={"paging_levels": 3}), errno.EINVAL)
    info = ok(await client.post("/v1/vms", json={"paging_levels": 5}), 201)
    assert info["paging_levels"] == 5


async def test_list_vms_paginated_by_id(client: httpx.AsyncClient) -> None:
    ids = [await new_vm(client, name=f"vm{i}") for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = ok(await client.get("/v1/vms", params=params))
        assert len(page["items"]) <= 2
        seen += [v["id"] for v in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert pages == 3


async def test_delete_vm(client: httpx.AsyncClient, vm: str) -> None:
    r = ok(await client.delete(f"/v1/vms/{vm}"))
    assert r["cause"] == "vm_destroy"
    assert_problem(await client.get(f"/v1/vms/{vm}"), 404)
    assert_problem(await client.delete(f"/v1/vms/{vm}"), 404)
    assert_problem(await client.get(f"/v1/vms/{vm}/memslots"), 404)


async def test_vm_capabilities_depend_on_type(client: httpx.AsyncClient) -> None:
    default = await new_vm(client)
    td = await new_vm(client, vm_type="KVM_X86_TDX_VM")
    c0 = ok(await client.get(f"/v1/vms/{default}/capabilities"))
    ctd = ok(await client.get(f"/v1/vms/{td}/capabilities"))
    assert c0["KVM_CAP_MULTI_ADDRESS_SPACE"] == 2
    assert ctd["KVM_CAP_MULTI_ADDRESS_SPACE"] == 1  # no SMM address space with private memory
    assert c0["KVM_CAP_READONLY_MEM"] == 1
    assert ctd["KVM_CAP_READONLY_MEM"] == 0
    assert c0["KVM_CAP_NR_MEMSLOTS"] == ctd["KVM_CAP_NR_MEMSLOTS"] == 32764


async def test_vcpus(client: httpx.AsyncClient) -> None:
    vm = await new_vm(client, vcpus=2)
    r = await client.post(f"/v1/vms/{vm}/vcpus", json={"id": "0x5"})
    assert ok(r, 201)["id"] == 5
    assert etag(r)
    ids = [v["id"] for v in ok(await client.get(f"/v1/vms/{vm}/vcpus"))["items"]]
    assert ids == [0, 1, 5]
    before = await state(client, vm)
    assert_errno(await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 1}), errno.EEXIST)
    assert await state(client, vm) == before
    page = ok(await client.get(f"/v1/vms/{vm}/vcpus", params={"limit": 2}))
    assert [v["id"] for v in page["items"]] == [0, 1]
    page = ok(await client.get(f"/v1/vms/{vm}/vcpus", params={"cursor": page["next_cursor"]}))
    assert [v["id"] for v in page["items"]] == [5]
    assert page["next_cursor"] is None


async def test_quirks_view(client: httpx.AsyncClient) -> None:
    default = await new_vm(client)
    td = await new_vm(client, vm_type=5)
    for vm, applicable in ((default, True), (td, False)):
        q = ok(await client.get(f"/v1/vms/{vm}/quirks"))
        by_name = {x["name"]: x for x in q["quirks"]}
        zap_all = by_name["KVM_X86_QUIRK_SLOT_ZAP_ALL"]
        assert zap_all["bit"] == 7
        assert zap_all["enabled"] is True
        assert zap_all["applicable"] is applicable
        assert q["enabled_mask"] & SLOT_ZAP_ALL


@pytest.mark.parametrize(
    "mask",
    [SLOT_ZAP_ALL, hex(SLOT_ZAP_ALL), ["KVM_X86_QUIRK_SLOT_ZAP_ALL"], str(SLOT_ZAP_ALL)],
)
async def test_disable_quirks2_by_number_hex_or_names(
    client: httpx.AsyncClient, vm: str, mask: object
) -> None:
    r = await client.post(
        f"/v1/vms/{vm}/enable-cap", json={"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [mask]}
    )
    answer = ok(r)
    assert etag(r)
    q = ok(await client.get(f"/v1/vms/{vm}/quirks"))
    # enable-cap answers the state after the call.
    assert answer == {
        "quirks": q,
        "manual_dirty_log_protect": 0,
        "manual_dirty_log_protect_names": [],
        "hypercall_exit_enabled": 0,
    }
    assert q["disabled_mask"] == CD_NW_CLEARED | SLOT_ZAP_ALL == 0x82
    assert q["enabled_mask"] == uapi.SUPPORTED_QUIRKS & ~0x82


async def test_enable_cap_by_number(client: httpx.AsyncClient, vm: str) -> None:
    r = await client.post(
        f"/v1/vms/{vm}/enable-cap",
        json={"cap": int(uapi.Cap.KVM_CAP_DISABLE_QUIRKS2), "args": [SLOT_ZAP_ALL, 0, 0, 0]},
    )
    ok(r)
    q = ok(await client.get(f"/v1/vms/{vm}/quirks"))
    assert q["disabled_mask"] == CD_NW_CLEARED | SLOT_ZAP_ALL == 0x82


@pytest.mark.parametrize(
    "body",
    [
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [1 << 40]},  # unsupported bit
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "flags": 1, "args": [SLOT_ZAP_ALL]},  # flags != 0
        {"cap": "KVM_CAP_NR_MEMSLOTS", "args": []},  # not enable-able
        {"cap": 9999, "args": []},
    ],
)
async def test_enable_cap_rejections_change_nothing(
    client: httpx.AsyncClient, vm: str, body: dict[str, object]
) -> None:
    before = await state(client, vm)
    assert_errno(await client.post(f"/v1/vms/{vm}/enable-cap", json=body), errno.EINVAL)
    assert await state(client, vm) == before


@pytest.mark.parametrize(
    "body",
    [
        {"cap": "KVM_CAP_NO_SUCH"},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [["KVM_X86_QUIRK_NOPE"]]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [0, 0, 0, 0, 0]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [2**64]},
        {"args": [1]},
    ],
)
async def test_enable_cap_malformed_is_422(
    client: httpx.AsyncClient, vm: str, body: dict[str, object]
) -> None:
    before = await state(client, vm)
    assert_problem(await client.post(f"/v1/vms/{vm}/enable-cap", json=body), 422)
    assert await state(client, vm) == before


async def test_disabling_is_sticky(client: httpx.AsyncClient, vm: str) -> None:
    cap = {"cap": "KVM_CAP_DISABLE_QUIRKS2"}
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap | {"args": [SLOT_ZAP_ALL]}))
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=cap | {"args": [0]}))
    q = ok(await client.get(f"/v1/vms/{vm}/quirks"))
    assert q["disabled_mask"] == CD_NW_CLEARED | SLOT_ZAP_ALL == 0x82


async def test_manual_dirty_log_protect_by_names(client: httpx.AsyncClient, vm: str) -> None:
    body = {
        "cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        "args": [["KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET"]],
    }
    ok(await client.post(f"/v1/vms/{vm}/enable-cap", json=body))
    bad = {"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [4]}
    assert_errno(await client.post(f"/v1/vms/{vm}/enable-cap", json=bad), errno.EINVAL)


async def test_vcpu_enters_smm_and_uses_address_space_1(client: httpx.AsyncClient, vm: str) -> None:
    """SMM slots (slot = 1 << 16 | id) serve a vCPU in SMM; private-memory VMs have none."""
    smram = {"guest_phys_addr": 0, "memory_size": 1 << 20, "userspace_addr": "0x7e0000000000"}
    r = await client.put(f"/v1/vms/{vm}/memslots/{1 << 16}", json=smram)
    assert r.status_code == 200, r.text
    host = {"userspace_addr": "0x7e0000000000", "data": "5a"}
    assert (await client.post(f"/v1/vms/{vm}/host-memory/write", json=host)).status_code == 200
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/smm", json={"smm": True})
    assert r.status_code == 200, r.text
    assert r.json()["as_id"] == 1 and r.json()["smm"] is True
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/load", json={"gpa": 0, "len": 1})
    assert r.json() == {"data": "5a", "exit": None}
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/smm", json={"smm": "yes"})
    assert r.status_code == 422
    td = (await client.post("/v1/vms", json={"vm_type": "KVM_X86_TDX_VM"})).json()["id"]
    r = await client.post(f"/v1/vms/{td}/vcpus/0/smm", json={"smm": True})
    assert r.status_code == 400 and r.json()["errno_name"] == "EINVAL"
