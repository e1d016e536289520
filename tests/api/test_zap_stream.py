"""GET …/zaps/stream: zap events as Server-Sent Events."""

from __future__ import annotations

import json

import httpx

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
