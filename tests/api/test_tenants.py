"""Tenant isolation: a tenant sees and changes its own VMs only, everywhere (routes, lists,
forks, event streams, metric labels); another's VM answers exactly like one that does not
exist; the admin sees all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.api.auth_helpers import ADMIN, METRICS, bearer, issue, secured
from tests.api.helpers import HVA, MiB, assert_problem, ok


async def tenants(make_client: Callable[..., Any], **overrides: Any) -> tuple[Any, dict[str, Any]]:
    client = await secured(make_client, **overrides)
    heads = {name: bearer((await issue(client, name))["token"]) for name in ("a", "b")}
    heads["admin"] = bearer(ADMIN)
    return client, heads


async def busy_vm(client: Any, head: dict[str, str]) -> str:
    vm = str(ok(await client.post("/v1/vms", json={"name": "x"}, headers=head), 201)["id"])
    slot = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}
    ok(await client.put(f"/v1/vms/{vm}/memslots/0", json=slot, headers=head))
    access = {"gpa": 0, "size": 8192, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=access, headers=head))
    return vm


async def test_another_tenants_vm_is_not_found_anywhere(make_client: Callable[..., Any]) -> None:
    client, h = await tenants(make_client)
    vm_a = await busy_vm(client, h["a"])
    snap = ok(await client.post(f"/v1/vms/{vm_a}/snapshots", json={}, headers=h["a"]), 201)
    missing = "vm-0000000000000000000000"
    for path in (
        f"/v1/vms/{vm_a}",
        f"/v1/vms/{vm_a}/memslots",
        f"/v1/vms/{vm_a}/snapshots",
        f"/v1/vms/{vm_a}/snapshots/{snap['id']}",
        f"/v1/vms/{vm_a}/stats",
        f"/v1/vms/{vm_a}/zaps",
        f"/v1/vms/{vm_a}/events?timeout=0.1",
    ):
        theirs = assert_problem(await client.get(path, headers=h["b"]), 404)
        nothing = assert_problem(await client.get(path.replace(vm_a, missing), headers=h["b"]), 404)
        # No enumeration: the same answer as for a VM that does not exist.
        assert theirs["title"] == nothing["title"], path
    assert_problem(await client.delete(f"/v1/vms/{vm_a}", headers=h["b"]), 404)
    restore = f"/v1/vms/{vm_a}/snapshots/{snap['id']}/restore"
    assert_problem(await client.post(restore, headers=h["b"]), 404)
    whatif = {"ops": [{"op": "delete_memslot", "slot": 0}], "variants": [{"name": "x"}]}
    assert_problem(await client.post(f"/v1/vms/{vm_a}/what-if", json=whatif, headers=h["b"]), 404)
    # A fork of another tenant's snapshot: no such snapshot.
    fork = await client.post("/v1/vms", json={"from_snapshot": snap["id"]}, headers=h["b"])
    assert_problem(fork, 404)
    # Nothing of it changed; its owner and the admin still see it.
    assert ok(await client.get(f"/v1/vms/{vm_a}", headers=h["a"]))["version"] == 2
    assert ok(await client.get(f"/v1/vms/{vm_a}", headers=h["admin"]))["tenant"] == "a"
    own_fork = await client.post("/v1/vms", json={"from_snapshot": snap["id"]}, headers=h["a"])
    assert ok(own_fork, 201)["tenant"] == "a"


async def test_lists_streams_and_metrics_hold_only_the_tenants_own(
    make_client: Callable[..., Any],
) -> None:
    client, h = await tenants(make_client)
    vm_a = await busy_vm(client, h["a"])
    vm_b = await busy_vm(client, h["b"])
    ids = {"a": vm_a, "b": vm_b}
    for me, other in (("a", "b"), ("b", "a")):
        listed = ok(await client.get("/v1/vms", headers=h[me]))["items"]
        assert [v["id"] for v in listed] == [ids[me]]
        events = await client.get("/v1/events", params={"after": 0, "timeout": 0.2}, headers=h[me])
        assert ids[me] in events.text and ids[other] not in events.text
        scrape = await client.get("/metrics", headers=h[me])
        assert ids[me] in scrape.text and ids[other] not in scrape.text
    everything = ok(await client.get("/v1/vms", headers=h["admin"]))["items"]
    assert {v["id"] for v in everything} == {vm_a, vm_b}
    for head in (h["admin"], bearer(METRICS)):
        scrape = (await client.get("/metrics", headers=head)).text
        assert vm_a in scrape and vm_b in scrape
    events = await client.get("/v1/events", params={"after": 0, "timeout": 0.2}, headers=h["admin"])
    assert vm_a in events.text and vm_b in events.text


async def test_a_live_stream_never_carries_another_tenants_events(
    make_client: Callable[..., Any],
) -> None:
    client, h = await tenants(make_client)
    stream = asyncio.ensure_future(
        client.get("/v1/events", params={"timeout": 1.0}, headers=h["b"])
    )
    while not client.app.state.service.events.subscribers:  # until the stream is open
        await asyncio.sleep(0.01)
    vm_a = await busy_vm(client, h["a"])
    vm_b = await busy_vm(client, h["b"])
    text = (await stream).text
    assert vm_b in text and vm_a not in text
