"""Per-tenant quotas: each trips with a problem answer and leaves everything as it was; the
admin is bound only by the service's own budgets."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any

from tests.api.auth_helpers import ADMIN, bearer, issue, secured
from tests.api.helpers import HVA, MiB, assert_errno, assert_problem, ok, state

KiB = 1024


async def tenant(make_client: Callable[..., Any], **quotas: Any) -> tuple[Any, dict[str, str]]:
    client = await secured(make_client, **quotas)
    return client, bearer((await issue(client, "a"))["token"])


async def snapshot_of(client: Any, vm: str, head: dict[str, str]) -> dict[str, Any]:
    """What a refused call must leave unchanged (`state` as the admin sees it)."""
    client.headers.update(bearer(ADMIN))
    try:
        out = await state(client, vm)
        out["snapshots"] = ok(await client.get(f"/v1/vms/{vm}/snapshots"))
        out["vms"] = ok(await client.get("/v1/vms"))
        return out
    finally:
        del client.headers["Authorization"]


async def test_vm_quota(make_client: Callable[..., Any]) -> None:
    client, me = await tenant(make_client, tenant_max_vms=2)
    vms = [ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"] for _ in range(2)]
    before = await snapshot_of(client, vms[0], me)
    body = assert_errno(await client.post("/v1/vms", json={}, headers=me), errno.ENOMEM)
    assert "VKMMU_TENANT_MAX_VMS" in body["detail"]
    snap = ok(await client.post(f"/v1/vms/{vms[0]}/snapshots", json={}, headers=me), 201)
    before = await snapshot_of(client, vms[0], me)
    fork = await client.post("/v1/vms", json={"from_snapshot": snap["id"]}, headers=me)
    assert_errno(fork, errno.ENOMEM)
    assert await snapshot_of(client, vms[0], me) == before
    # The admin's own VMs are not the tenant's, and the admin has no tenant quota.
    for _ in range(3):
        ok(await client.post("/v1/vms", json={}, headers=bearer(ADMIN)), 201)
    # Deleting one makes room again.
    ok(await client.delete(f"/v1/vms/{vms[1]}", headers=me))
    ok(await client.post("/v1/vms", json={}, headers=me), 201)


async def test_snapshot_quota(make_client: Callable[..., Any]) -> None:
    client, me = await tenant(make_client, tenant_max_snapshots=2)
    vms = [ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"] for _ in range(2)]
    for vm in vms:  # counted over all the tenant's VMs
        ok(await client.post(f"/v1/vms/{vm}/snapshots", json={}, headers=me), 201)
    before = await snapshot_of(client, vms[0], me)
    r = await client.post(f"/v1/vms/{vms[0]}/snapshots", json={}, headers=me)
    assert "VKMMU_TENANT_MAX_SNAPSHOTS" in assert_errno(r, errno.ENOMEM)["detail"]
    assert await snapshot_of(client, vms[0], me) == before


async def test_content_bytes_quota(make_client: Callable[..., Any]) -> None:
    client, me = await tenant(make_client, tenant_content_bytes=64 * KiB)
    vm = ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"]
    write = {"userspace_addr": HVA, "data": "ab" * (16 * KiB)}
    ok(await client.post(f"/v1/vms/{vm}/host-memory/write", json=write, headers=me))
    before = await snapshot_of(client, vm, me)
    again = {"userspace_addr": HVA + MiB, "data": "ab" * (16 * KiB)}
    r = await client.post(f"/v1/vms/{vm}/host-memory/write", json=again, headers=me)
    assert "VKMMU_TENANT_CONTENT_BYTES" in assert_errno(r, errno.ENOMEM)["detail"]
    assert await snapshot_of(client, vm, me) == before
    # The admin's call on the same VM is not the tenant's.
    ok(await client.post(f"/v1/vms/{vm}/host-memory/write", json=again, headers=bearer(ADMIN)))


async def test_page_table_bytes_quota(make_client: Callable[..., Any]) -> None:
    client, me = await tenant(make_client, tenant_page_table_bytes=256 * KiB)
    vm = ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"]
    slot = {"guest_phys_addr": 0, "memory_size": 1 << 30, "userspace_addr": HVA}
    ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=slot, headers=me))
    small = {"gpa": 0, "size": 8192, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=small, headers=me))
    before = await snapshot_of(client, vm, me)
    big = {"gpa": 0, "size": 1 << 30, "access": "write"}
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=big, headers=me)
    assert "VKMMU_TENANT_PAGE_TABLE_BYTES" in assert_errno(r, errno.ENOMEM)["detail"]
    assert await snapshot_of(client, vm, me) == before


async def test_event_stream_quota(make_client: Callable[..., Any]) -> None:
    client, me = await tenant(make_client, tenant_max_streams=1)
    first = asyncio.ensure_future(client.get("/v1/events", params={"timeout": 0.5}, headers=me))
    while not client.app.state.stream_slots.open("a"):  # until the first stream is open
        await asyncio.sleep(0.01)
    r = await client.get("/v1/events", params={"timeout": 0.1}, headers=me)
    assert_problem(r, 429)
    assert r.headers["retry-after"] == "1"
    assert (
        await client.get("/v1/events", params={"timeout": 0.1}, headers=bearer(ADMIN))
    ).status_code == 200
    assert (await first).status_code == 200
    # Closed: the slot is free again.
    assert (await client.get("/v1/events", params={"timeout": 0.1}, headers=me)).status_code == 200


WHAT_IF = {"ops": [{"op": "delete_memslot", "slot": 0}], "variants": [{"name": "x"}]}


async def test_what_if_copies_count_in_the_page_table_quota(
    make_client: Callable[..., Any],
) -> None:
    client, me = await tenant(make_client, tenant_page_table_bytes=24 * KiB)
    admin = bearer(ADMIN)
    vm = ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"]
    slot = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}
    ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=slot, headers=me))
    # The tables are built by the admin's call (its estimate is not bound by the tenant's
    # quota), but held by the tenant's VM: a walk to gpa 0, a root and three levels below.
    access = {"gpa": 0, "size": 8192, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=access, headers=admin))
    tables = ok(await client.get(f"/v1/vms/{vm}/stats", headers=me))["page_tables"]
    assert tables == 4  # so the VM fits the quota and the VM with a copy of it does not
    before = await snapshot_of(client, vm, me)
    r = await client.post(f"/v1/vms/{vm}/what-if", json=WHAT_IF, headers=me)
    detail = assert_errno(r, errno.ENOMEM)["detail"]
    assert "copy" in detail and "VKMMU_TENANT_PAGE_TABLE_BYTES" in detail
    assert await snapshot_of(client, vm, me) == before
    # The admin's what-if is bound by the service's budget only.
    out = ok(await client.post(f"/v1/vms/{vm}/what-if", json=WHAT_IF, headers=admin))
    assert [v["name"] for v in out["variants"]] == ["x"]


async def test_what_if_copies_count_in_the_content_quota_while_they_run(
    make_client: Callable[..., Any],
) -> None:
    client, me = await tenant(make_client, tenant_content_bytes=40 * KiB)
    vm = ok(await client.post("/v1/vms", json={}, headers=me), 201)["id"]
    slot = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}
    ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=slot, headers=me))

    async def write(at: int, pages: int) -> None:
        # The admin's writes (not bound by the tenant's quota), held by the tenant's VM.
        body = {"userspace_addr": HVA + at, "data": "ab" * (4 * KiB) * pages}
        url = f"/v1/vms/{vm}/host-memory/write"
        ok(await client.post(url, json=body, headers=bearer(ADMIN)))

    await write(0, 4)  # 16 KiB held; with a copy, 32 of 40 KiB
    ok(await client.post(f"/v1/vms/{vm}/what-if", json=WHAT_IF, headers=me))
    # The copy is gone once the what-if answered: 48 KiB would not fit.
    ok(await client.post(f"/v1/vms/{vm}/what-if", json=WHAT_IF, headers=me))
    await write(16 * KiB, 2)  # 24 KiB held; with a copy, 48
    before = await snapshot_of(client, vm, me)
    r = await client.post(f"/v1/vms/{vm}/what-if", json=WHAT_IF, headers=me)
    detail = assert_errno(r, errno.ENOMEM)["detail"]
    assert "copy" in detail and "VKMMU_TENANT_CONTENT_BYTES" in detail
    assert await snapshot_of(client, vm, me) == before
