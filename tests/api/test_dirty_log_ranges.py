"""KVM_CLEAR_DIRTY_LOG over HTTP: a range past the slot is a problem+json EINVAL (never a 500)
and changes nothing."""

from __future__ import annotations

import base64
import errno

import httpx
import pytest

from .helpers import MiB, assert_errno, ok, put_slot, state

NPAGES = 256  # slot 0 = [0, 1M)


def ones(npages: int) -> str:
    return base64.b64encode(b"\xff" * (-(-npages // 64) * 8)).decode()


@pytest.mark.parametrize(
    "first, num",
    [(0, NPAGES + 64), (64, NPAGES), (NPAGES, 64), (NPAGES + 64, 0), (0, 2**32 - 64)],
)
async def test_clear_past_the_slot_is_einval_problem_json(
    client: httpx.AsyncClient, vm: str, first: int, num: int
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB, flags=["KVM_MEM_LOG_DIRTY_PAGES"]))
    access = {"gpa": 0, "size": MiB, "access": "write"}
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=access))
    before = await state(client, vm)
    body = {"first_page": first, "num_pages": num, "bitmap": ones(min(num, 4096) or 64)}
    r = await client.post(f"/v1/vms/{vm}/memslots/0/dirty-log/clear", json=body)
    assert_errno(r, errno.EINVAL)
    assert await state(client, vm) == before


async def test_clear_up_to_the_end_of_the_slot_is_accepted(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB, flags=["KVM_MEM_LOG_DIRTY_PAGES"]))
    body = {"first_page": 64, "num_pages": NPAGES - 64, "bitmap": ones(NPAGES - 64)}
    r = await client.post(f"/v1/vms/{vm}/memslots/0/dirty-log/clear", json=body)
    assert ok(r)["cleared"] == 0
