"""GET …/zaps/stream: zap events as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from .helpers import MiB, assert_problem, ok, put_slot


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if fields:
            events.append(
                {
                    "event": fields["event"],
                    "id": int(fields["id"]),
                    "data": json.loads(fields["data"]),
                }
            )
    return events


async def test_stream_replays_events_after_a_seq_and_ends_by_itself(
    client: httpx.AsyncClient, vm: str
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": MiB}))
    ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))
    ok(await client.delete(f"/v1/vms/{vm}/memslots/0"))
    r = await client.get(f"/v1/vms/{vm}/zaps/stream", params={"timeout": 0.3})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [e["data"]["cause"] for e in events] == ["explicit", "memslot_delete"]
    assert [e["id"] for e in events] == [e["data"]["seq"] for e in events]
    assert events[0]["data"]["sptes_zapped"]["4k"] == 256
    # Resuming after the first id gives only what came later (Last-Event-ID works the same).
    r = await client.get(
        f"/v1/vms/{vm}/zaps/stream",
        params={"timeout": 0.3},
        headers={"Last-Event-ID": str(events[0]["id"])},
    )
    assert [e["data"]["cause"] for e in parse_sse(r.text)] == ["memslot_delete"]


async def test_stream_of_an_unknown_vm_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/vms/nope/zaps/stream", params={"timeout": 0.1}), 404)


async def test_stream_ends_cleanly_when_the_vm_is_deleted(
    client: httpx.AsyncClient, vm: str, caplog: pytest.LogCaptureFixture
) -> None:
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": MiB}))
    ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))

    async def delete_soon() -> httpx.Response:
        await asyncio.sleep(0.3)
        return await client.delete(f"/v1/vms/{vm}")

    with caplog.at_level(logging.INFO):
        stream, deleted = await asyncio.gather(
            client.get(f"/v1/vms/{vm}/zaps/stream", params={"timeout": 30}),
            delete_soon(),
        )
    ok(deleted)
    # A whole 200 stream (it ended long before its timeout): the events, then why it ended.
    assert stream.status_code == 200
    blocks = [b for b in stream.text.split("\n\n") if b]
    assert blocks[-1] == 'event: end\ndata: {"reason": "vm_deleted"}'
    events = parse_sse("\n\n".join(blocks[:-1]))
    assert [e["data"]["cause"] for e in events] == ["explicit"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
