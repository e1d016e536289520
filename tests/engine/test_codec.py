"""Snapshots of the engine state: dumps/loads round trip, digest, and rejection of bad bytes
(docs/engine-contract.md "Snapshots")."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from app.engine import Vm, codec, uapi
from app.engine.ops import parse

U = 0x7F00_0000_0000
KB4, MB, GB = 1 << 12, 1 << 20, 1 << 30

# A workload that leaves every kind of state behind: 4K and huge leaves, MMIO SPTEs, a
# write-protected dirty-logging slot, a zap-slot-leafs hole with empty tables, host contents,
# discarded pages and zap events.
OPS: list[tuple[str, dict]] = [
    ("enable_cap", dict(cap="KVM_CAP_DISABLE_QUIRKS2", args=[0x80, 0, 0, 0])),
    ("host_advise", dict(userspace_addr=U + GB, len=4 * MB, advice="hugepage")),
    (
        "set_user_memory_region",
        dict(slot=0, flags=0, guest_phys_addr=0, memory_size=4 * MB, userspace_addr=U),
    ),
    (
        "set_user_memory_region",
        dict(slot=1, flags=0, guest_phys_addr=GB, memory_size=6 * MB, userspace_addr=U + GB),
    ),
    (
        "set_user_memory_region",
        dict(
            slot=2, flags=1, guest_phys_addr=2 * GB, memory_size=2 * MB, userspace_addr=U + 2 * GB
        ),
    ),
    ("access", dict(vcpu=0, gpa=0, size=4 * MB, access="write")),
    ("access", dict(vcpu=1, gpa=GB, size=6 * MB, access="read")),
    ("access", dict(vcpu=0, gpa=2 * GB, size=MB, access="write")),
    ("access", dict(vcpu=0, gpa=3 * GB, size=KB4, access="read")),  # MMIO exit
    ("store", dict(vcpu=0, gpa=0x1230, data="00112233445566778899")),
    ("host_write", dict(userspace_addr=U + GB + 0x40, data="feedface")),
    ("host_discard", dict(userspace_addr=U + 0x8000, len=2 * KB4)),
    ("get_dirty_log", dict(slot=2)),
    (
        "set_user_memory_region",
        dict(slot=0, flags=0, guest_phys_addr=64 * MB, memory_size=4 * MB, userspace_addr=U),
    ),
]


def build(ops: list[tuple[str, dict]] = OPS) -> Vm:
    vm = Vm.create(0, 2)
    for i, (op, args) in enumerate(ops):
        vm.apply(parse(op, args), at=1000.0 + i)
    return vm


def views(vm: Vm) -> dict:
    """Everything a client can read, minus wall-clock durations."""
    events = [{k: v for k, v in e.items() if k != "duration_us"} for e in vm.zap_events()]
    return {
        "info": vm.info(),
        "memslots": vm.memslots(),
        "stats": vm.stats(),
        "roots": vm.roots(),
        "vcpus": vm.vcpus_view(),
        "mappings": vm.mappings(),
        "events": events,
        "translate": [vm.translate(g) for g in (0x1000, 64 * MB + 0x1230, GB + 0x40, 3 * GB)],
        "host": vm.host_read(U + 0x1230, 16),
        "audit": vm.audit(),
    }


def test_round_trip_keeps_the_digest_and_every_view() -> None:
    vm = build()
    blob = codec.dumps(vm)
    back = codec.loads(blob)
    assert views(back) == views(vm)
    assert back.audit()["ok"]
    assert codec.digest(back) == codec.digest(vm)


def test_loaded_vm_behaves_like_the_original() -> None:
    vm = build()
    back = codec.loads(codec.dumps(vm))
    more = [
        ("load", dict(vcpu=0, gpa=64 * MB + 0x1230, len=10)),
        ("access", dict(vcpu=1, gpa=64 * MB, size=4 * MB, access="write")),
        (
            "set_user_memory_region",
            dict(slot=1, flags=0, guest_phys_addr=0, memory_size=0, userspace_addr=0),
        ),
        ("get_dirty_log", dict(slot=2)),
    ]
    for i, (op, args) in enumerate(more):
        a = copy.deepcopy(vm.apply(parse(op, args), at=2000.0 + i))
        b = copy.deepcopy(back.apply(parse(op, args), at=2000.0 + i))
        for r in (a, b):
            if isinstance(r.get("zap"), dict):
                r["zap"].pop("duration_us")
        assert a == b
    assert views(back) == views(vm)
    assert codec.digest(back) == codec.digest(vm)


def test_replaying_the_same_calls_gives_the_same_digest() -> None:
    assert codec.digest(build()) == codec.digest(build())


def test_digest_changes_with_the_state() -> None:
    vm = build()
    d0 = codec.digest(vm)
    vm.apply(parse("store", dict(vcpu=0, gpa=64 * MB, data="01")), at=5000.0)
    assert codec.digest(vm) != d0


def test_dumps_does_not_disturb_the_vm() -> None:
    vm = build()
    before = views(vm)
    codec.dumps(vm)
    codec.digest(vm)
    assert views(vm) == before
    vm.apply(parse("access", dict(vcpu=0, gpa=64 * MB, size=MB, access="read")))
    assert vm.audit()["ok"]


@pytest.mark.parametrize("vm_type, vcpus, levels", [(0, 1, 4), (1, 0, 5)])
def test_a_fresh_vm_without_page_tables_round_trips(vm_type: int, vcpus: int, levels: int) -> None:
    vm = Vm.create(vm_type, vcpus, paging_levels=levels, name="empty")
    back = codec.loads(codec.dumps(vm))
    assert back.info() == vm.info()
    assert codec.digest(back) == codec.digest(vm)


def test_a_vm_whose_tables_were_all_freed_round_trips() -> None:
    vm = build(
        OPS[2:3]
        + [
            ("access", dict(vcpu=0, gpa=0, size=MB, access="write")),
            (
                "set_user_memory_region",
                dict(slot=0, flags=0, guest_phys_addr=0, memory_size=0, userspace_addr=0),
            ),
        ]
    )
    assert vm.stats()["page_tables"] == 0  # zap all freed every table
    back = codec.loads(codec.dumps(vm))
    assert views(back) == views(vm)


@pytest.mark.parametrize("where", ["magic", "version", "digest", "body_start", "body_mid", "last"])
def test_a_corrupt_byte_is_rejected(where: str) -> None:
    blob = bytearray(codec.dumps(build()))
    pos = {
        "magic": 0,
        "version": 8,
        "digest": 20,
        "body_start": 48,
        "body_mid": 48 + (len(blob) - 48) // 2,
        "last": len(blob) - 1,
    }[where]
    blob[pos] ^= 0x01
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(bytes(blob))


@pytest.mark.parametrize("keep", [0, 7, 47, 48, 100, -1])
def test_truncated_snapshot_is_rejected(keep: int) -> None:
    blob = codec.dumps(build())
    cut = blob[:keep] if keep >= 0 else blob[:-1]
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(cut)


def test_trailing_garbage_is_rejected() -> None:
    blob = codec.dumps(build())
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(blob + b"\x00")


def test_not_a_snapshot_is_rejected() -> None:
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(b'{"vm_type": 0}' * 8)


DATA = Path(__file__).parent / "data"


def test_a_stored_version_2_snapshot_still_loads_to_its_digest() -> None:
    """Written once (by `dumps` of `build()`) and kept: a later rename of an attribute, a
    module or a class must leave it loadable, since the format names none of them."""
    expected = json.loads((DATA / "snapshot_v2.json").read_text())
    back = codec.loads((DATA / "snapshot_v2.bin").read_bytes())
    assert codec.digest(back) == expected["digest"] == codec.digest(build())


def test_a_schema_2_document_loads_counts_and_is_written_again_as_rows() -> None:
    """Schema 2 wrote each memslot as an object, schema 3 as a row under `slot_fields`: the
    stored schema-2 snapshot decodes and is sized from its document, and written again it is
    schema 3 with the same digest."""
    old = (DATA / "snapshot_v2.bin").read_bytes()
    back = codec.loads(old)
    assert codec.footprint(old)["bitmap_entries"] == sum(len(bm) for bm in back.dirty.values())
    again = codec.dumps(back)
    body = memoryview(again)[codec._HEADER.size :]
    state = json.loads(dict(codec._sections(body))["state"].tobytes())
    assert state["schema"] == 3 and state["slot_fields"][:3] == ["as_id", "id", "base_gfn"]
    rows = [row for sp in state["spaces"] for row in sp["slots"]]
    assert len(rows) == len(back.memslots()) and all(len(r) == 10 for r in rows)
    assert codec.digest(codec.loads(again)) == codec.digest(back)


def test_the_state_document_names_no_python_attribute_or_class() -> None:
    body = memoryview(codec.dumps(build()))[codec._HEADER.size :]
    sections = dict(codec._sections(body))
    doc = sections["state"].tobytes().decode()
    assert "app.engine" not in doc and "__" not in doc

    def keys(node: object) -> set[str]:
        if isinstance(node, dict):
            return set(node) | set().union(*(keys(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(keys(v) for v in node)) if node else set()
        return set()

    state = json.loads(doc)
    # Private attribute names (`_by_id`, `_runs`, `_entries`, …) never reach the format.
    assert not [k for k in keys({k: v for k, v in state.items() if k != "events"}) if k[:1] == "_"]
    assert state["schema"] == codec.SCHEMA


class _Boom:
    ran = False

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_Boom._fire, ())

    @staticmethod
    def _fire() -> None:
        _Boom.ran = True


def test_a_version_1_pickle_is_refused_without_being_unpickled() -> None:
    state = zlib.compress(pickle.dumps(_Boom()))
    body = struct.pack("<Q", len(state)) + state
    blob = codec._HEADER.pack(codec.MAGIC, 1, 0, hashlib.sha256(body).digest()) + body
    with pytest.raises(codec.CorruptSnapshot, match="VERSION 1"):
        codec.loads(blob)
    assert not _Boom.ran


def test_footprint_counts_what_the_decoded_vm_holds() -> None:
    """Read from the state document and section headers only: what a fork or reload of the
    snapshot will hold, reserved before it is decoded."""
    vm = build()
    back = codec.loads(codec.dumps(vm))
    assert codec.footprint(codec.dumps(vm)) == {
        "tables": back.mmu.pool.live,
        "content_pages": len(back.host.contents) + sum(len(f.contents) for f in back.gmem),
        "bitmap_entries": sum(len(bm) for bm in back.dirty.values()),
        "events": len(back.events),
    }
    with pytest.raises(codec.CorruptSnapshot):
        codec.footprint(b"not a snapshot")


def _contents_vm() -> Vm:
    """Written host pages of varied content, more than one decompression piece of them, and
    a guest_memfd's written pages."""
    vm = Vm.create(0, 1)
    rng = random.Random(14)
    for i in range(320):  # 1.25 MiB of pages that barely compress
        data = rng.randbytes(4096)
        vm.apply(parse("host_write", dict(userspace_addr=U + i * KB4 * 3, data=data.hex())))
    flags = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP | uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)
    fd = vm.apply(parse("create_guest_memfd", dict(size=4 * MB, flags=flags)))["fd"]
    vm.apply(parse("gmem_write", dict(fd=fd, offset=100, data=rng.randbytes(3 * KB4).hex())))
    return vm


def test_written_pages_round_trip_page_by_page() -> None:
    """Contents decode page by page from one compressed stream (never all at once): every
    page comes back, in its place, across the stream's pieces."""
    vm = _contents_vm()
    blob = codec.dumps(vm)
    back = codec.loads(blob)
    assert back.host.contents == vm.host.contents
    assert all(isinstance(p, bytearray) for p in back.host.contents.values())
    assert [f.contents for f in back.gmem] == [f.contents for f in vm.gmem] != [{}]
    assert codec.digest(back) == codec.digest(vm)
    assert views(back) == views(vm)


def test_contents_shorter_than_their_lengths_are_corrupt() -> None:
    """Page lengths that promise more than the data section holds, under a right checksum:
    refused as corrupt, not a short page."""
    blob = codec.dumps(_contents_vm())
    head = codec._HEADER.size
    body, pos, parts = memoryview(blob)[head:], 0, []
    while pos < len(body):
        mlen, rlen = codec._SECTION.unpack_from(body, pos)
        end = pos + codec._SECTION.size + mlen + rlen
        name = bytes(body[pos + codec._SECTION.size :][:mlen]).split(b";")[0]
        part = bytes(body[pos:end])
        if name == b"host/lens":
            lens = np.frombuffer(zlib.decompress(part[codec._SECTION.size + mlen :]), np.int64)
            part = codec._section("host/lens", lens + 1)
        parts.append(part)
        pos = end
    new = b"".join(parts)
    bad = codec._HEADER.pack(codec.MAGIC, codec.VERSION, 0, hashlib.sha256(new).digest()) + new
    with pytest.raises(codec.CorruptSnapshot):
        codec.loads(bad)
