"""Assertions shared by the API tests."""

from __future__ import annotations

import errno as _errno
from typing import Any

import httpx

from app.api.errors import ERRNO_STATUS, PROBLEM_JSON, errno_name

MiB = 1 << 20
GiB = 1 << 30
HVA = 0x7F00_0000_0000  # a page-aligned user address, far from anything else


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    body = r.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:vkmmu:problem:")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str)
    return body  # type: ignore[no-any-return]


def assert_errno(r: httpx.Response, err: int) -> dict[str, Any]:
    """A KVM rejection: the status the contract gives this errno, `errno`, `errno_name`."""
    body = assert_problem(r, ERRNO_STATUS.get(err, 400))
    assert body["errno"] == err, f"expected {_errno.errorcode[err]}, got {body}"
    assert body["errno_name"] == errno_name(err)
    return body


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


def etag(r: httpx.Response) -> str:
    tag = r.headers.get("etag")
    assert tag, f"no ETag on {r.request.method} {r.request.url}"
    return tag


async def new_vm(client: httpx.AsyncClient, **body: Any) -> str:
    return str(ok(await client.post("/v1/vms", json=body), 201)["id"])


async def put_slot(
    client: httpx.AsyncClient,
    vm: str,
    slot: int | str,
    *,
    gpa: int,
    size: int,
    hva: int = HVA,
    flags: Any = 0,
    **extra: Any,
) -> httpx.Response:
    body = {
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": hva,
        "flags": flags,
        **extra,
    }
    return await client.put(f"/v1/vms/{vm}/memslots/{slot}", json=body)


async def state(client: httpx.AsyncClient, vm: str) -> dict[str, Any]:
    """What a failed call must leave unchanged: the version, memslots, quirks, stats."""
    info = await client.get(f"/v1/vms/{vm}")
    return {
        "etag": etag(info),
        "memslots": ok(await client.get(f"/v1/vms/{vm}/memslots", params={"limit": 1000})),
        "quirks": ok(await client.get(f"/v1/vms/{vm}/quirks")),
        "gmem": ok(await client.get(f"/v1/vms/{vm}/guest-memfds")),
        "attrs": ok(await client.get(f"/v1/vms/{vm}/memory-attributes")),
        "roots": ok(await client.get(f"/v1/vms/{vm}/roots")),
        "vcpus": [v["id"] for v in ok(await client.get(f"/v1/vms/{vm}/vcpus"))["items"]],
    }
