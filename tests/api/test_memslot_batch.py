"""POST /v1/vms/{vm}/memslots/batch: the ioctls in order, one transaction, stop at the first
rejection; what is left equals the same calls made one by one."""

from __future__ import annotations

import errno
from typing import Any

import httpx

from .helpers import HVA, assert_problem, etag, ok, put_slot, state

MiB = 1 << 20


def region(slot: int, gpa: int, size: int = 2 * MiB, **kw: Any) -> dict[str, Any]:
    return {
        "slot": slot,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": HVA + gpa,
        **kw,
    }


async def batch(
    client: httpx.AsyncClient, vm: str, regions: list[dict[str, Any]], **kw: Any
) -> httpx.Response:
    return await client.post(f"/v1/vms/{vm}/memslots/batch", json={"regions": regions}, **kw)


async def test_applies_in_order_and_stops_at_the_first_rejection(
    client: httpx.AsyncClient, vm: str
) -> None:
    regions = [
        region(0, 0),
        region(1, 2 * MiB),
        region(2, MiB),  # overlaps slot 0: EEXIST (kvm_set_memory_region)
        region(3, 8 * MiB),
    ]
    r = await batch(client, vm, regions)
    body = ok(r)
    assert [x["outcome"] for x in body["results"]] == [
        "applied",
        "applied",
        "rejected",
        "not_attempted",
    ]
    assert [x["change"] for x in body["results"]] == ["create", "create", None, None]
    rejected = body["results"][2]
    assert (rejected["errno"], rejected["errno_name"]) == (errno.EEXIST, "EEXIST")
    assert rejected["state_changed"] is False and rejected["detail"]
    assert body["applied"] == 2
    slots = ok(await client.get(f"/v1/vms/{vm}/memslots"))["items"]
    assert [s["slot"] for s in slots] == [0, 1]
    info = await client.get(f"/v1/vms/{vm}")
    assert etag(r) == etag(info)


async def test_the_same_state_as_one_call_at_a_time(client: httpx.AsyncClient) -> None:
    calls = [
        region(0, 0, 4 * MiB),
        region(1, 4 * MiB),
        region(0, 0, 4 * MiB, flags="KVM_MEM_LOG_DIRTY_PAGES"),
        region(1, 64 * MiB, userspace_addr=HVA + 4 * MiB),  # a move
        region(1, 0, 0),  # a delete
        region(0x10002, 0),  # address space 1 (SMM)
        region(5, 4 * MiB, 2 * MiB, flags="KVM_MEM_READONLY"),
    ]
    one = ok(await client.post("/v1/vms", json={"vcpus": 1}), 201)["id"]
    for c in calls:
        args = {k: v for k, v in c.items() if k != "slot"}
        ok(
            await put_slot(
                client,
                one,
                c["slot"],
                gpa=args.pop("guest_phys_addr"),
                size=args.pop("memory_size"),
                hva=args.pop("userspace_addr"),
                **args,
            )
        )
    many = ok(await client.post("/v1/vms", json={"vcpus": 1}), 201)["id"]
    body = ok(await batch(client, many, calls))
    assert [x["outcome"] for x in body["results"]] == ["applied"] * len(calls)
    assert [x["change"] for x in body["results"]] == [
        "create",
        "create",
        "flags_only",
        "move",
        "delete",
        "create",
        "create",
    ]
    a, b = await state(client, one), await state(client, many)
    assert a.pop("etag") == b.pop("etag")  # one journal record per call either way
    assert a == b


async def test_each_applied_call_is_journaled_and_published(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await batch(client, vm, [region(0, 0), region(1, 2 * MiB), region(1, 0, 0)]))
    r = await client.get(
        f"/v1/vms/{vm}/events", params={"after": 0, "timeout": 0.2, "types": "memslot"}
    )
    changes = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(changes) == 3 and '"change":"delete"' in changes[-1].replace(" ", "")


async def test_a_failed_precondition_or_a_bad_body_changes_nothing(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    before = await state(client, vm)
    r = await batch(client, vm, [region(1, 2 * MiB)], headers={"If-Match": '"stale"'})
    assert_problem(r, 412)
    assert_problem(await batch(client, vm, []), 422)
    assert_problem(
        await batch(client, vm, [{"guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0}]),
        422,
    )
    assert_problem(await batch(client, vm, [region(1, 2 * MiB, bogus=1)]), 422)
    assert await state(client, vm) == before


async def test_the_batch_size_is_bounded(make_client: Any) -> None:
    c = await make_client(max_batch=2)
    vm = ok(await c.post("/v1/vms", json={}), 201)["id"]
    r = await batch(c, vm, [region(i, i * 2 * MiB) for i in range(3)])
    (err,) = assert_problem(r, 422)["errors"]
    assert tuple(err["loc"]) == ("body", "regions") and "VKMMU_MAX_BATCH" in err["msg"]
    assert ok(await batch(c, vm, [region(i, i * 2 * MiB) for i in range(2)]))["applied"] == 2


async def test_a_region_as_the_slot_already_is_changes_nothing(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await batch(client, vm, [region(0, 0)]))
    r = await batch(client, vm, [region(0, 0), region(1, 2 * MiB)])
    body = ok(r)
    assert [(x["outcome"], x["change"]) for x in body["results"]] == [
        ("applied", "none"),
        ("applied", "create"),
    ]
    assert body["applied"] == 2 and r.headers["content-type"] == "application/json"
    assert etag(r) == etag(await client.get(f"/v1/vms/{vm}"))
