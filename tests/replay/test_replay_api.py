"""POST /v1/vms/{vm}/replay: every line applied through the journal, outcomes against `ret`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from app.services.qemu_trace import parse
from tests.replay.conftest import TRACES

MiB = 1 << 20
BOOT = (TRACES / "pc-boot-smm.trace").read_text()


async def _vm(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/vms", json={"name": "replay"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _replay(client: httpx.AsyncClient, vm: str, body: str, **params: Any) -> httpx.Response:
    return await client.post(
        f"/v1/vms/{vm}/replay",
        content=body.encode(),
        headers={"Content-Type": "text/plain"},
        params=params,
    )


def _final_layout(text: str) -> dict[int, tuple[int, int, int, int]]:
    """What the trace leaves: slot -> (flags, gpa, size, ua), from the trace alone."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for c in parse(text).calls:
        if c.ret != 0:
            continue
        if c.size == 0:
            out.pop(c.slot, None)
        else:
            out[c.slot] = (c.flags, c.gpa, c.size, c.ua)
    return out


async def test_boot_trace_with_smm_slots_replays_with_every_ret_matching(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(max_body_bytes=4 * MiB)
    vm = await _vm(client)
    r = await _replay(client, vm, BOOT)
    assert r.status_code == 200, r.text
    body = r.json()
    calls = parse(BOOT).calls
    assert len(calls) >= 300 and body["applied"] == len(calls)
    assert body["mismatches"] == 0 and body["mismatched_lines"] == []
    assert all(row["matches_trace"] and row["ok"] for row in body["results"])
    assert [row["line"] for row in body["results"]] == [c.line for c in calls]
    assert body["errors"] == []
    assert body["ignored"] == body["lines"] - len(calls) > 0
    smm = [row for row in body["results"] if row["slot"] >> 16 == 1]
    assert smm and {row["change"] for row in smm} >= {"create", "delete"}
    deletes = [row for row in body["results"] if row["change"] == "delete"]
    # A default VM with the quirk on: every delete is a fast zap, in the fixed event shape.
    assert deletes and all(row["zap"]["path"] == "zap_all_fast" for row in deletes)
    assert all(
        (row["zap"]["as_id"], row["zap"]["slot"]) == (row["slot"] >> 16, row["slot"] & 0xFFFF)
        for row in deletes
    )
    assert r.headers["ETag"] == f'"{len(calls)}"'  # one journal record per call

    # The VM keeps the result: its memslots are the trace's final layout, also after it is
    # rebuilt from the journal.
    want = _final_layout(BOOT)

    async def layout() -> dict[int, tuple[int, int, int, int]]:
        r = await client.get(f"/v1/vms/{vm}/memslots", params={"limit": 1000})
        return {
            m["slot"]: (m["flags"], m["guest_phys_addr"], m["memory_size"], m["userspace_addr"])
            for m in r.json()["items"]
        }

    assert await layout() == want
    assert client.app.state.service.evict(vm)  # type: ignore[attr-defined]
    assert await layout() == want


async def test_a_wrong_ret_is_flagged_with_its_line(make_client: Callable[..., Any]) -> None:
    client = await make_client(max_body_bytes=4 * MiB)
    vm = await _vm(client)
    lines = BOOT.splitlines()
    # The 40th call: traced as refused with EINVAL, although KVM accepts it.
    calls = parse(BOOT).calls
    target = calls[39]
    lines[target.line - 1] = lines[target.line - 1].replace("ret=0", "ret=-22")
    r = await _replay(client, vm, "\n".join(lines) + "\n")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mismatches"] == 1 and body["mismatched_lines"] == [target.line]
    (row,) = [row for row in body["results"] if not row["matches_trace"]]
    assert row["line"] == target.line and row["ok"] and row["ret"] == -22
    assert row["errno"] is None


async def test_a_refused_call_matches_a_negative_ret(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    trace = (
        "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x100000 ua=0x7f0000000000 ret=0\n"
        "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x80000 size=0x100000 ua=0x7f1000000000 "
        "ret=-17\n"
        "kvm_set_user_memory Slot#2 flags=0x0 gpa=0x1000 size=0x1001 ua=0x7f2000000000 ret=0\n"
    )
    body = (await _replay(client, vm, trace)).json()
    rows = body["results"]
    assert [r["ok"] for r in rows] == [True, False, False]
    assert rows[1]["errno_name"] == "EEXIST" and rows[1]["matches_trace"]
    assert rows[2]["errno_name"] == "EINVAL" and not rows[2]["matches_trace"]
    assert rows[2]["detail"]
    assert body["mismatches"] == 1


async def test_bad_lines_are_reported_with_their_number_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    vm = await _vm(client)
    trace = (
        "# header\n"
        "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x100000 ua=0x7f0000000000 ret=0\n"
        "kvm_set_user_memory Slot#zz\n"
        "\xff\xfe garbage kvm_set_user_memory\n"
        "kvm_set_user_memory AddrSpace#0 Slot#1 flags=0x4 gpa=0x200000 size=0x1000 ua=0x0 "
        "guest_memfd=12 guest_memfd_offset=0x0 ret=0\n"
    )
    r = await client.post(
        f"/v1/vms/{vm}/replay",
        content=trace.encode("latin-1"),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] == 1 and body["ignored"] == 2
    assert [e["line"] for e in body["errors"]] == [3, 5]
    assert "guest_memfd" in body["errors"][1]["message"]


async def test_json_lines_and_media_types(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    lines = [
        {"slot": 0, "flags": 0, "gpa": "0x0", "size": "0x100000", "ua": "0x7f0000000000"},
        {"as_id": 1, "slot": 3, "gpa": 0, "size": 0x100000, "ua": 0x7F0000000000, "ret": 0},
        "not an object",
        {"slot": 1, "gpa": 0},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    r = await client.post(
        f"/v1/vms/{vm}/replay", content=text, headers={"Content-Type": "application/x-ndjson"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [row["slot"] for row in body["results"]] == [0, 65539]
    assert all(row["matches_trace"] for row in body["results"])
    assert [e["line"] for e in body["errors"]] == [3, 4]
    r = await client.post(
        f"/v1/vms/{vm}/replay", content=b"x", headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 415
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_limits_and_unknown_vm(client: httpx.AsyncClient) -> None:
    vm = await _vm(client)
    # The suite's body limit is 64 KiB: the boot trace is bigger.
    assert len(BOOT.encode()) > 64 * 1024
    r = await _replay(client, vm, BOOT)
    assert r.status_code == 413
    r = await client.get(f"/v1/vms/{vm}/memslots")
    assert r.json()["items"] == []  # nothing applied
    assert (await _replay(client, "vm-nope", "")).status_code == 404
    assert (await _replay(client, vm, "", touch="sometimes")).status_code == 422


async def test_touch_all_ram_counts_refaults_after_each_fast_zap(
    client: httpx.AsyncClient,
) -> None:
    vm = await _vm(client)
    ram = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x400000 ua=0x7f0000000000 ret=0\n"
    vga_on = (
        "kvm_set_user_memory Slot#1 flags=0x0 gpa=0xa00000 size=0x20000 ua=0x7f1000000000 ret=0\n"
    )
    vga_off = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0xa00000 size=0x0 ua=0x7f1000000000 ret=0\n"
    trace = ram + (vga_on + vga_off) * 3
    body = (await _replay(client, vm, trace, touch="all_ram")).json()
    pages = 0x400000 // 4096
    # RAM touched when created, then again after each of the 3 fast zaps.
    assert body["touch"]["accesses"] == 4
    assert body["touch"]["refaults"] == 3 * pages
    # The same with touched ranges given explicitly.
    vm2 = await _vm(client)
    body2 = (await _replay(client, vm2, trace, touch="0x0+0x200000")).json()
    assert body2["touch"]["refaults"] == 3 * (0x200000 // 4096)


async def test_progress_streams_as_server_sent_events(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(max_body_bytes=4 * MiB)
    vm = await _vm(client)
    r = await client.post(
        f"/v1/vms/{vm}/replay",
        content=BOOT.encode(),
        headers={"Content-Type": "text/plain", "Accept": "text/event-stream"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n", 1) for block in r.text.strip().split("\n\n")]
    kinds = [e[0] for e in events]
    assert kinds[-1] == "event: result" and "event: progress" in kinds
    progress = [
        json.loads(e[1].removeprefix("data: ")) for e in events if e[0] == "event: progress"
    ]
    total = len(parse(BOOT).calls)
    assert progress[-1] == {"done": total, "total": total}
    result = json.loads(events[-1][1].removeprefix("data: "))
    assert result["applied"] == total and result["mismatches"] == 0
    r = await client.post(
        "/v1/vms/vm-nope/replay", content=b"", headers={"Accept": "text/event-stream"}
    )
    assert r.status_code == 404


async def test_if_match_names_the_version_the_replay_starts_from(
    client: httpx.AsyncClient,
) -> None:
    vm = await _vm(client)
    line = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x100000 ua=0x7f0000000000 ret=0\n"
    r = await client.post(f"/v1/vms/{vm}/replay", content=line, headers={"If-Match": '"7"'})
    assert r.status_code == 412 and r.headers["ETag"] == '"0"'
    assert (await client.get(f"/v1/vms/{vm}/memslots")).json()["items"] == []
    r = await client.post(f"/v1/vms/{vm}/replay", content=line, headers={"If-Match": '"0"'})
    assert r.status_code == 200 and r.headers["ETag"] == '"1"'
