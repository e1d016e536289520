"""Versions over HTTP: If-Match on every mutating call (VM delete and snapshot restore
included), strong comparison, and the ETag of a rejected call that still changed state."""

from __future__ import annotations

import errno

import httpx

from .helpers import HVA, GiB, MiB, assert_errno, assert_problem, etag, ok, put_slot, state


async def test_delete_vm_honours_if_match(client: httpx.AsyncClient, vm: str) -> None:
    v0 = etag(await client.get(f"/v1/vms/{vm}"))
    r = await put_slot(client, vm, 0, gpa=0, size=MiB)
    ok(r)
    v1 = etag(r)
    assert v1 != v0
    r = await client.delete(f"/v1/vms/{vm}", headers={"If-Match": v0})
    assert_problem(r, 412)
    assert etag(r) == v1
    ok(await client.get(f"/v1/vms/{vm}"))  # still there
    ok(await client.delete(f"/v1/vms/{vm}", headers={"If-Match": v1}))
    assert_problem(await client.get(f"/v1/vms/{vm}"), 404)


async def test_restore_honours_if_match(client: httpx.AsyncClient, vm: str) -> None:
    snap = ok(await client.post(f"/v1/vms/{vm}/snapshots"), 201)
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    stale = '"0"'
    before = await state(client, vm)
    restore = f"/v1/vms/{vm}/snapshots/{snap['id']}/restore"
    r = await client.post(restore, headers={"If-Match": stale})
    assert_problem(r, 412)
    assert etag(r) == before["etag"]
    assert await state(client, vm) == before
    r = await client.post(restore, headers={"If-Match": before["etag"]})
    ok(r)
    assert ok(await client.get(f"/v1/vms/{vm}/memslots"))["items"] == []


async def test_if_match_is_strong_and_the_412_is_bounded(
    client: httpx.AsyncClient, vm: str
) -> None:
    current = etag(await client.get(f"/v1/vms/{vm}"))
    body = {"id": 4}
    for weak in ("W/" + current, f'"x", W/{current}'):
        r = await client.post(f"/v1/vms/{vm}/vcpus", json=body, headers={"If-Match": weak})
        assert_problem(r, 412)
        assert etag(r) == current
    huge = '"' + "9" * 5000 + '"'
    r = await client.post(f"/v1/vms/{vm}/vcpus", json=body, headers={"If-Match": huge})
    problem = assert_problem(r, 412)
    shown = problem["detail"].split("If-Match ", 1)[1].split(" does not match")[0]
    assert shown.startswith('"999') and len(shown) <= 100
    # Any strong tag of the list may match; `*` always does.
    ok(
        await client.post(
            f"/v1/vms/{vm}/vcpus", json=body, headers={"If-Match": f'"x", {current}'}
        ),
        201,
    )
    ok(await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 5}, headers={"If-Match": "*"}), 201)


async def test_state_changing_rejection_answers_the_new_etag(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=GiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 2 * MiB}))
    before = etag(await client.get(f"/v1/vms/{vm}"))
    # A MOVE past the max GFN: KVM zaps the old slot before its late check fails (EINVAL).
    r = await put_slot(client, vm, 0, gpa=(1 << 52) - 4 * 4096, size=GiB)
    body = assert_errno(r, errno.EINVAL)
    assert body["state_changed"] is True
    after = etag(await client.get(f"/v1/vms/{vm}"))
    assert after != before and etag(r) == after
    assert ok(await client.get(f"/v1/vms/{vm}/zaps"))["items"][0]["cause"] == "memslot_move"
    # The slot is back where it was, and the next call can be conditional on the new tag.
    assert ok(await client.get(f"/v1/vms/{vm}/memslots/0"))["guest_phys_addr"] == 0
    r = await client.put(
        f"/v1/vms/{vm}/memslots/1",
        json={"guest_phys_addr": 2 * GiB, "memory_size": MiB, "userspace_addr": HVA + 2 * GiB},
        headers={"If-Match": etag(r)},
    )
    ok(r)
    # A rejection that changed nothing says so by leaving the field out (and sends no ETag).
    r = await put_slot(client, vm, 2, gpa=0, size=MiB, hva=HVA + 4 * GiB)
    body = assert_errno(r, errno.EEXIST)
    assert "state_changed" not in body and "etag" not in r.headers
