"""GET /v1/events and …/vms/{vm}/events: delivery, filters, resume, slow clients, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.services.events import EventBus
from app.services.vms import VmService
from tests.api.helpers import MiB, assert_problem, new_vm, ok, put_slot

from .workload import delete_a_slot, touch


def parse(text: str) -> list[dict[str, Any]]:
    """SSE blocks as {event, id?, data}; comments (heartbeats) as {"comment": …}."""
    out: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        ev: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                ev["comment"] = line[1:].strip()
                continue
            key, _, value = line.partition(": ")
            ev[key] = json.loads(value) if key in ("data", "id") else value
        out.append(ev)
    return out


def real(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "id" in e]


async def test_events_are_typed_and_resumable(client: httpx.AsyncClient) -> None:
    vm = await delete_a_slot(client, quirk=True)
    r = ok(await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 8 * MiB, "size": 8}))
    assert r["exit"]["reason"] == "KVM_EXIT_MMIO"
    ok(await client.post(f"/v1/vms/{vm}/snapshots"), 201)

    r = await client.get("/v1/events", params={"after": 0, "timeout": 0.2})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ")
    events = real(parse(r.text))
    types = [e["event"] for e in events]
    assert types == [
        "vm_created",
        "memslot",
        "memslot",
        "fault",
        "fault",
        "memslot",
        "zap",
        "exit",
        "snapshot",
    ]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for e in events:
        assert e["data"]["id"] == e["id"] and e["data"]["type"] == e["event"]
        assert e["data"]["vm"] == vm
        # Times in RFC 3339 UTC, as in every REST answer.
        assert datetime.fromisoformat(e["data"]["at"]).tzinfo == UTC
    zap = events[6]["data"]["data"]
    # The zap as `GET …/zaps` gives it, `at` included.
    listed = ok(await client.get(f"/v1/vms/{vm}/zaps"))["items"]
    assert [z["at"] for z in listed if z["seq"] == zap["seq"]] == [zap["at"]]
    assert (zap["cause"], zap["path"], zap["slot_zap_all"]) == (
        "memslot_delete",
        "zap_all_fast",
        True,
    )
    assert zap["sptes_zapped"]["direct"]["4k"] == 24
    assert events[5]["data"]["data"]["change"] == "delete"
    assert events[7]["data"]["data"]["reason"] == "KVM_EXIT_MMIO"

    # Resume after the zap with Last-Event-ID: only what came later.
    r = await client.get(
        "/v1/events", params={"timeout": 0.2}, headers={"Last-Event-ID": str(ids[6])}
    )
    assert [e["event"] for e in real(parse(r.text))] == ["exit", "snapshot"]
    # ?types= filters; an unknown type is a 422 naming the parameter.
    r = await client.get("/v1/events", params={"after": 0, "types": "zap,exit", "timeout": 0.1})
    assert [e["event"] for e in real(parse(r.text))] == ["zap", "exit"]
    problem = assert_problem(await client.get("/v1/events", params={"types": "zap,nope"}), 422)
    assert problem["errors"][0]["loc"] == ["query", "types"]


async def test_a_new_stream_gets_live_events_and_heartbeats(client: httpx.AsyncClient) -> None:
    before = await new_vm(client)

    async def act() -> str:
        await asyncio.sleep(0.3)
        vm = await new_vm(client)
        ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
        return vm

    r, vm = await asyncio.gather(
        client.get("/v1/events", params={"timeout": 1.0, "heartbeat": 0.1}), act()
    )
    events = parse(r.text)
    # Nothing from before it opened; the live events; heartbeats while idle.
    assert [(e["event"], e["data"]["vm"]) for e in real(events)] == [
        ("vm_created", vm),
        ("memslot", vm),
    ]
    assert before != vm
    assert any(e.get("comment") == "keep-alive" for e in events)


async def test_vm_stream_has_only_that_vm_and_ends_when_it_is_deleted(
    client: httpx.AsyncClient,
) -> None:
    vm = await new_vm(client)
    other = await new_vm(client)
    assert_problem(await client.get("/v1/vms/vm-0123/events"), 404)

    async def act() -> None:
        await asyncio.sleep(0.3)
        ok(await put_slot(client, other, 0, gpa=0, size=MiB))
        ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
        await touch(client, vm, 0, 8192)
        ok(await client.delete(f"/v1/vms/{vm}"))

    r, _ = await asyncio.gather(client.get(f"/v1/vms/{vm}/events", params={"timeout": 30}), act())
    events = parse(r.text)
    assert [e["event"] for e in events if "event" in e] == [
        "memslot",
        "fault",
        "zap",
        "vm_deleted",
        "end",
    ]
    assert events[-1]["data"] == {"reason": "vm_deleted"}
    assert "id" not in events[-1]  # a control event never moves the resume point
    assert {e["data"]["vm"] for e in real(events)} == {vm}


async def test_a_resume_point_older_than_the_ring_says_events_were_lost(
    make_client: Callable[..., Any], settings: Any
) -> None:
    service = VmService(settings.database_url, run_migrations=False)
    service.events = EventBus(ring_size=4)
    client = await make_client(service)
    vm = await new_vm(client)
    first = service.events.ring[-1].id
    for slot in range(6):
        ok(await put_slot(client, vm, slot, gpa=slot * MiB, size=MiB))
    r = await client.get("/v1/events", params={"after": first, "timeout": 0.1})
    events = parse(r.text)[1:]
    assert events[0]["event"] == "gap"
    assert events[0]["data"]["after"] == first
    # Then what the ring still holds: the last four slots.
    assert [e["data"]["data"]["slot"] for e in real(events)] == [2, 3, 4, 5]


def test_bus_drops_a_subscriber_that_falls_behind() -> None:
    async def run() -> None:
        bus = EventBus(queue_max=3)
        slow = bus.subscribe()
        fast = bus.subscribe(types=["zap"])
        for i in range(5):
            bus.publish("memslot", "vm-1", {"slot": i})
        assert slow.dropped and not slow.queue  # its buffer was freed at once
        assert not fast.dropped and not fast.queue
        got = [item async for item in bus.stream(slow, after=bus.ring[-1].id)]
        assert len(got) == 1 and got[0].type == "dropped"  # type: ignore[union-attr]
        assert bus.dropped_total == 1 and bus.subscribers == 1

    asyncio.run(run())


@pytest.mark.parametrize("run", [1, 2, 3, 5, 7])
def test_a_run_of_events_is_what_as_many_single_publishes_are(run: int) -> None:
    """`publish_many` (a memslot batch's events) against one `publish` per event: the same
    ring, the same last evicted id, the same queues and the same drops."""

    def feed(bus: EventBus, items: list[tuple[str, dict[str, Any]]], one_by_one: bool) -> None:
        for i in range(0, len(items), run):
            chunk = items[i : i + run]
            if one_by_one:
                for type_, data in chunk:
                    bus.publish(type_, "vm-1", data)
            else:
                bus.publish_many("vm-1", chunk)

    items = [("zap" if i % 3 == 0 else "memslot", {"slot": i}) for i in range(11)]
    seen = []
    for one_by_one in (True, False):
        bus = EventBus(ring_size=4, queue_max=5)
        subs = [bus.subscribe(), bus.subscribe(types=["zap"]), bus.subscribe(vm="vm-2")]
        bus._next_id = 10**17  # ids consecutive whatever the clock says
        runs: list[list[Any]] = []
        bus.add_listener(runs.append)
        feed(bus, items, one_by_one)
        assert [e.id for e in bus.ring] == list(range(10**17 + 8, 10**17 + 12))
        assert [e.data["slot"] for r in runs for e in r] == list(range(11))
        seen.append(
            (
                [e.data["slot"] for e in bus.ring],
                bus.evicted_upto,
                [(s.dropped, [e.data["slot"] for e in s.queue]) for s in subs],
                bus.dropped_total,
            )
        )
    assert seen[0] == seen[1]
    ring, evicted, queues, dropped = seen[1]
    assert ring == [7, 8, 9, 10] and evicted == 10**17 + 7
    assert queues == [(True, []), (False, [0, 3, 6, 9]), (False, [])] and dropped == 1


async def _asgi_get(app: Any, path: str, query: bytes, send_gate: asyncio.Event) -> list[bytes]:
    """Drive the ASGI app as a server whose socket blocks until `send_gate` opens: a client
    that does not read."""
    chunks: list[bytes] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"vkmmu.test")],
        "client": ("127.0.0.1", 1),
        "server": ("vkmmu.test", 80),
        "state": {},
    }
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if message.get("body"):
                await send_gate.wait()
                chunks.append(message["body"])
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return chunks


async def test_a_slow_client_is_dropped_with_a_final_event(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(events_queue_max=4)
    app = client.app  # type: ignore[attr-defined]
    bus = app.state.service.events
    vm = await new_vm(client)
    gate = asyncio.Event()
    task = asyncio.create_task(_asgi_get(app, "/v1/events", b"timeout=30", gate))
    while bus.subscribers == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the stream has sent `retry:` and blocks on the socket
    for slot in range(12):
        ok(await put_slot(client, vm, slot, gpa=slot * MiB, size=MiB))
    assert bus.subscribers == 1 and bus.dropped_total == 1
    gate.set()
    body = b"".join(await asyncio.wait_for(task, 10)).decode()
    events = parse(body)
    # What was handed over before the buffer overflowed, then the drop, then nothing.
    assert events[-1]["event"] == "dropped"
    assert events[-1]["data"]["reason"] == "slow_client"
    delivered = real(events)
    assert len(delivered) <= 5
    if delivered:
        assert events[-1]["data"]["last_id"] == delivered[-1]["id"]
    assert bus.subscribers == 0
    # It resumes from the last id it got, without a gap: the ring still holds the rest.
    r = await client.get(
        "/v1/events",
        params={"timeout": 0.1, "types": "memslot"},
        headers={"Last-Event-ID": str(events[-1]["data"]["last_id"])},
    )
    resumed = real(parse(r.text))
    slots = [e["data"]["data"]["slot"] for e in delivered + resumed if e["event"] == "memslot"]
    assert slots == list(range(12))


async def test_streams_end_cleanly_on_shutdown(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    app = client.app  # type: ignore[attr-defined]
    service = app.state.service
    gate = asyncio.Event()
    gate.set()
    task = asyncio.create_task(_asgi_get(app, "/v1/events", b"", gate))
    while service.events.subscribers == 0:
        await asyncio.sleep(0.01)
    await service.stop()
    body = b"".join(await asyncio.wait_for(task, 10)).decode()
    assert parse(body)[-1] == {"event": "end", "data": {"reason": "shutdown"}}
    await service.start()  # the fixture stops it again


@pytest.mark.parametrize("bad", ["-1", "x"])
async def test_bad_after_is_a_422(client: httpx.AsyncClient, bad: str) -> None:
    assert_problem(await client.get("/v1/events", params={"after": bad}), 422)
