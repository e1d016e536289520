"""Engine state to bytes and back (snapshots): versioned data, never pickle.

Layout: MAGIC (8) | version u32 | flags u32 | sha256 of the body (32) | body.

VERSION 2 body: a sequence of sections, each `u32 meta length | u64 data length | meta | data`
with meta `name;dtype;shape` and data the zlib-compressed array. The first section, `state`,
is the JSON document (uint8) of everything but bulk data, under `"schema": 2`; its keys are
the snapshot's own names, not Python attribute names, so renaming an attribute does not
invalidate stored snapshots. Then the page tables, one section group per pool chunk (rows
delta-encoded along each row first: a run of leaves differs by one pfn step, so rows compress
to almost nothing), the dirty bitmaps and the written host / guest_memfd pages.

Writing reads the live VM and changes nothing in it (other threads may be reading it, e.g. for
the service's page-table budget); the tables go out one chunk at a time and written pages one
page at a time, into the buffer that becomes the snapshot: a snapshot never holds a second
full copy of either. Reading is the same the other way: table chunks go straight into the
pool as they are decompressed, pages into the VM as their stream is (`bench/
snapshot_memory.py`: the peak stays within 1.1x the VM's state either way).

VERSION 1 bodies were pickles. Unpickling bytes read back from a database would run whatever
they say, so they are refused (`CorruptSnapshot`) and the service rebuilds the VM from the
journal instead. The checksum is verified before anything is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .gmem import GmemFile
from .host_profile import HostProfile
from .intervals import IntervalSet
from .memslots import Memslot
from .paging import TablePool, recycle_when_dropped
from .roots import Root, RootRole
from .tdx import TdxState
from .vcpu import Vcpu
from .vm import Vm

MAGIC = b"VKMMUSN\x00"
VERSION = 2
SCHEMA = 3
# Schema 3 writes each memslot as a row under the document's `slot_fields` (2 wrote one object
# per slot: at 32,763 slots, building those objects was most of a snapshot's encoding).
READABLE_SCHEMAS = (2, 3)
_HEADER = struct.Struct("<8sII32s")
_SECTION = struct.Struct("<IQ")


class CorruptSnapshot(ValueError):
    """The bytes are not a snapshot this version can load (bad magic, version or checksum)."""


# ---------------------------------------------------------------------------- sections
def _section(name: str, arr: np.ndarray, delta: bool = False) -> bytes:
    a = np.ascontiguousarray(arr)
    if delta and a.size:
        flat = a.ravel()
        d = np.empty_like(flat)
        d[0] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=d[1:])  # uint64 wraps: exact round trip
        a = d.reshape(a.shape)
    raw = zlib.compress(memoryview(a).cast("B") if a.size else b"", 1)  # type: ignore[arg-type]
    meta = f"{name};{a.dtype.str};{','.join(map(str, a.shape))}".encode()
    return _SECTION.pack(len(meta), len(raw)) + meta + raw


# Compressed bytes fed to (and decompressed bytes taken from) a content stream at a time.
_PIECE = 1 << 20


class _Stream:
    """A compressed section of page contents, read page by page as it decompresses: the
    pages go straight into the VM, never all decompressed at once next to their copies."""

    def __init__(self, raw: memoryview, size: int) -> None:
        self._raw = raw
        self._pos = 0
        self._z = zlib.decompressobj()
        self._buf = b""
        self._at = 0  # bytes of `_buf` already taken
        self.size = size  # decompressed bytes, as the section header says

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._at < n:
            if self._z.unconsumed_tail:
                piece = self._z.decompress(self._z.unconsumed_tail, _PIECE)
            elif self._pos < len(self._raw):
                fed = self._raw[self._pos : self._pos + _PIECE]
                self._pos += len(fed)
                piece = self._z.decompress(fed, _PIECE)
            else:
                raise ValueError("page contents shorter than their lengths say")
            self._buf, self._at = self._buf[self._at :] + piece, 0
        out = self._buf[self._at : self._at + n]
        self._at += n
        return out


Section = np.ndarray | _Stream


def _sections(body: memoryview) -> Iterator[tuple[str, Section]]:
    pos = 0
    while pos < len(body):
        mlen, rlen = _SECTION.unpack_from(body, pos)
        pos += _SECTION.size
        name, dtype, shape_s = bytes(body[pos : pos + mlen]).decode().split(";")
        pos += mlen
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError("object arrays are not data")
        shape = tuple(int(x) for x in shape_s.split(",") if x)
        if name.endswith("/data") and dt == np.uint8 and len(shape) == 1:
            yield name, _Stream(body[pos : pos + rlen], shape[0])
            pos += rlen
            continue
        a = np.frombuffer(zlib.decompress(body[pos : pos + rlen]), dtype=dt).reshape(shape)
        pos += rlen
        if name.endswith("/entries") and a.size:
            a = np.cumsum(a.ravel(), dtype=np.uint64).reshape(shape)
        yield name, a


def _write_pages(out: io.BytesIO, name: str, d: dict[int, Any]) -> None:
    """Written pages as three sections (keys, lengths, data). The data section is
    compressed page by page straight into `out`: the pages are never joined into a second
    copy of them all."""
    keys = sorted(d)
    lens = np.array([len(d[k]) for k in keys], dtype=np.int64)
    out.write(_section(f"{name}/keys", np.array(keys, dtype=np.int64)))
    out.write(_section(f"{name}/lens", lens))
    meta = f"{name}/data;{np.dtype(np.uint8).str};{int(lens.sum())}".encode()
    at = out.tell()
    out.write(_SECTION.pack(len(meta), 0) + meta)
    z = zlib.compressobj(1)
    written = 0
    for k in keys:
        written += out.write(z.compress(d[k]))
    written += out.write(z.flush())
    end = out.tell()
    out.seek(at)
    out.write(_SECTION.pack(len(meta), written))  # the length, now known
    out.seek(end)


def _unpages(keys: Section, lens: Section, data: Section) -> Iterator[tuple[int, bytes]]:
    """The pages of a content section, one at a time (decompressed as they are taken)."""
    if not isinstance(keys, np.ndarray) or not isinstance(lens, np.ndarray):
        raise ValueError("page keys and lengths are arrays")
    if isinstance(data, np.ndarray):  # not written by this build's `dumps`: whole already
        raw, pos = data.tobytes(), 0
        for k, n in zip(keys.tolist(), lens.tolist(), strict=True):
            yield int(k), raw[pos : pos + n]
            pos += n
        return
    if int(lens.sum()) != data.size:
        raise ValueError("page lengths do not add up to the contents")
    for k, n in zip(keys.tolist(), lens.tolist(), strict=True):
        yield int(k), data.read(int(n))


# ---------------------------------------------------------------------------- state document


def _slots(st: dict[str, Any], space: dict[str, Any]) -> list[dict[str, Any]]:
    """A space's memslots as objects: schema 3 rows under `slot_fields`, schema 2 objects."""
    if st["schema"] == 2:
        return list(space["slots"])
    fields = st["slot_fields"]
    return [dict(zip(fields, row, strict=True)) for row in space["slots"]]


def _slot_of(d: dict[str, Any]) -> Memslot:
    return Memslot(
        as_id=d["as_id"],
        id=d["id"],
        base_gfn=d["base_gfn"],
        npages=d["npages"],
        flags=d["flags"],
        userspace_addr=d["userspace_addr"],
        guest_memfd=d["guest_memfd"],
        guest_memfd_offset=d["guest_memfd_offset"],
        invalid=d["invalid"],
        gmem_only=d["gmem_only"],
    )


def _root_json(r: Root) -> dict[str, Any]:
    return {
        "id": r.id,
        "as_id": r.as_id,
        "role": r.role.value,
        "level": r.level,
        "table": r.table,
        "gen": r.gen,
        "valid": r.valid,
        "leaves": list(r.leaves),
        "gmem_leaves": r.gmem_leaves,
    }


def _root_of(d: dict[str, Any]) -> Root:
    return Root(
        id=d["id"],
        as_id=d["as_id"],
        role=RootRole(d["role"]),
        level=d["level"],
        table=d["table"],
        gen=d["gen"],
        valid=d["valid"],
        leaves=list(d["leaves"]),
        gmem_leaves=d["gmem_leaves"],
    )


def _tdx_json(t: TdxState) -> dict[str, Any]:
    return {
        "ops": dict(t.ops),
        "epoch": t.epoch,
        "hkid_assigned": t.hkid_assigned,
        "accepted": t.accepted.to_list(),
        "blocked": t.blocked.to_list(),
        "lost": t.lost.to_list(),
        "reaccepts": t.reaccepts,
        "log": [list(x) for x in t.log],
        "lifecycle": t.lifecycle,
        "td_state": t.td_state,
        "init_vcpus": None if t.init_vcpus is None else sorted(t.init_vcpus),
        "attributes": t.attributes,
        "gpaw": t.gpaw,
        "premapped": t.premapped,
        "map_gpa": [[v, a, b] for v, (a, b) in sorted(t.map_gpa.items())],
    }


def _tdx_of(d: dict[str, Any]) -> TdxState:
    t = TdxState()
    t.ops = Counter(d["ops"])
    t.epoch = d["epoch"]
    t.hkid_assigned = d["hkid_assigned"]
    t.accepted = _intervals(d["accepted"])
    t.blocked = _intervals(d["blocked"])
    t.lost = _intervals(d["lost"])
    t.reaccepts = d["reaccepts"]
    t.log = deque((str(a), int(b), int(c)) for a, b, c in d["log"])
    t.log = deque(t.log, maxlen=256)
    # Snapshots from before the TD lifecycle hold runnable TDs (TdxState's defaults).
    t.lifecycle = d.get("lifecycle", False)
    t.td_state = d.get("td_state", "runnable")
    init = d.get("init_vcpus")
    t.init_vcpus = None if init is None else {int(i) for i in init}
    t.attributes = d.get("attributes", 0)
    t.gpaw = d.get("gpaw", 0)
    t.premapped = d.get("premapped", 0)
    t.map_gpa = {int(v): (int(a), int(b)) for v, a, b in d.get("map_gpa", [])}
    return t


def _intervals(pairs: list[list[int]]) -> IntervalSet:
    return IntervalSet([(int(a), int(b)) for a, b in pairs])


def _gmem_json(f: GmemFile) -> dict[str, Any]:
    return {
        "fd": f.fd,
        "size": f.size,
        "flags": f.flags,
        "base_pfn": f.base_pfn,
        "allocated": f.allocated.to_list(),
        "bindings": [[a, n, list(key)] for a, n, key in f.bindings],
        "closed": f.closed,
    }


def _host_json(vm: Vm) -> dict[str, Any]:
    return {
        "freed": vm.host.freed.to_list(),
        "runs": [list(r) for r in vm.host.runs()],
        "thp_populated": vm.host.thp_populated.to_list(),
    }


def _slot_row(s: Memslot) -> tuple[Any, ...]:
    return (
        s.as_id, s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr, s.guest_memfd,
        s.guest_memfd_offset, s.invalid, s.gmem_only,
    )  # fmt: skip


_SLOT_KEYS = (
    "as_id", "id", "base_gfn", "npages", "flags", "userspace_addr", "guest_memfd",
    "guest_memfd_offset", "invalid", "gmem_only",
)  # fmt: skip


def _vcpu_json(v: Vcpu) -> dict[str, Any]:
    return {
        "id": v.id,
        "as_id": v.as_id,
        "running": v.running,
        "roots": {r.value: rid for r, rid in v.roots.items()},
        "stats": dict(v.stats),
        "hypercall_exit": v.hypercall_exit,
    }


def _state_json(vm: Vm) -> dict[str, Any]:
    """The state document (memslots as rows of `_SLOT_KEYS`)."""
    mmu, gmem = vm.mmu, vm.gmem
    return {
        "schema": SCHEMA,
        "slot_fields": list(_SLOT_KEYS),
        "vm_type": int(vm.vm_type),
        "name": vm.name,
        "paging_levels": vm.paging_levels,
        "table_budget": vm.table_budget,
        "disabled_quirks": vm.disabled_quirks,
        "manual_dirty_log": vm.manual_dirty_log,
        "hypercall_exit_enabled": vm.hypercall_exit_enabled,
        "host_profile": vm.host_profile.to_dict(),
        "engine_rev": vm.engine_rev,
        "nx_huge_pages": [list(x) for x in vm.nx_huge_pages],
        "zap_policy": vm.zap_policy,
        "destroyed": vm.destroyed,
        "bugged": vm.bugged,
        "now": vm.now,
        "vcpus": [_vcpu_json(v) for v in vm.vcpus.values()],
        "spaces": [
            {"generation": sp.generation, "slots": [_slot_row(s) for s in sp.by_gfn()]}
            for sp in vm.spaces
        ],
        "gmem": {
            "first_fd": gmem.first_fd,
            "next_fd": gmem.next_fd,
            "next_pfn": gmem.next_pfn,
            "files": [_gmem_json(f) for f in gmem],
        },
        "private": vm.attrs.private.to_list(),
        "host": _host_json(vm),
        "mmu": {
            "next_root_id": mmu.next_root_id,
            "mmu_valid_gen": mmu.mmu_valid_gen,
            "pages": list(mmu.pages),
            "count_gmem": mmu.count_gmem,
            "roots": [_root_json(r) for r in mmu.roots.values()],
            "tables_top": mmu.pool.top,
            "tables_free": mmu.pool.free_rows,
        },
        "tdx": _tdx_json(vm.tdx) if vm.tdx is not None else None,
        "dirty": [list(k) for k in vm.dirty],
        "dirty_initially_set": sorted(list(k) for k in vm.dirty_initially_set),
        "zapped": vm.zapped.to_list(),
        "stats_kvm": dict(vm.stats_kvm),
        "stats_extra": dict(vm.stats_extra),
        "events": list(vm.events),
        "event_seq": vm.event_seq,
    }


# ---------------------------------------------------------------------------- dumps / loads
def dumps(vm: Vm) -> bytes:
    """The VM as VERSION 2 bytes. Reads only: the live VM is never detached or changed.

    Written into one buffer as it is encoded (a chunk of tables, a page at a time), which
    becomes the snapshot without a copy: the peak is the snapshot plus one chunk."""
    pages = [("host", vm.host.contents)] + [(f"gmem/{f.fd}", f.contents) for f in vm.gmem]
    dirty = (np.packbits(bm) for bm in vm.dirty.values())
    return _encode(_state_json(vm), vm.mmu.pool.export_chunks(), dirty, pages)


@dataclass
class Capture:
    """A VM's state copied at one instant, for `encode` to turn into a snapshot later: what
    must be consistent is copied (under the service's VM lock), the slow part (the JSON,
    compression, the checksum) runs after, while calls go on."""

    state: dict[str, Any]
    tables: list[dict[str, np.ndarray]]
    dirty: list[np.ndarray]
    pages: list[tuple[str, dict[int, bytes]]]


def capture(vm: Vm) -> Capture:
    """Copy what a snapshot of `vm` needs: the state document with memslots as tuples, the
    live page-table rows, packed dirty bitmaps, written pages. Reads only."""
    spare: list[np.ndarray] = []
    tables = vm.mmu.pool.copy_chunks(spare)
    pages = [("host", vm.host.contents)] + [(f"gmem/{f.fd}", f.contents) for f in vm.gmem]
    copy = Capture(
        state=_state_json(vm),
        tables=tables,
        dirty=[np.packbits(bm) for bm in vm.dirty.values()],
        pages=[(name, {k: bytes(v) for k, v in d.items()}) for name, d in pages],
    )
    recycle_when_dropped(copy, spare)
    return copy


def encode(c: Capture) -> bytes:
    """The snapshot of a `capture` (the same bytes `dumps` gives of the VM at that instant)."""
    return _encode(c.state, iter(c.tables), iter(c.dirty), c.pages)


def _state_bytes(state: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(state, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # an integer past 64 bits: the standard encoder takes it
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


def _encode(
    state: dict[str, Any],
    chunks: Iterator[dict[str, np.ndarray]],
    dirty: Iterator[np.ndarray],
    pages: list[tuple[str, dict[int, Any]]],
) -> bytes:
    out = io.BytesIO()
    out.write(bytes(_HEADER.size))  # the header, once the body's digest is known
    doc = _state_bytes(state)
    out.write(_section("state", np.frombuffer(doc, dtype=np.uint8)))
    for c, chunk in enumerate(chunks):
        for key, arr in chunk.items():
            out.write(_section(f"tables/{c}/{key}", arr, delta=key == "entries"))
    for i, bits in enumerate(dirty):
        out.write(_section(f"dirty/{i}", bits))
    for name, contents in pages:
        _write_pages(out, name, contents)
    with out.getbuffer() as whole, whole[_HEADER.size :] as body:
        digest = hashlib.sha256(body).digest()
    out.seek(0)
    out.write(_HEADER.pack(MAGIC, VERSION, 0, digest))
    # No view of the buffer is left: CPython hands the buffer itself over, not a copy.
    return out.getvalue()


def readable(data: bytes) -> bool:
    """Whether `data` starts like a snapshot this build decodes (magic and VERSION). Storage
    retention prunes the journal only behind such a snapshot: an older one is replaced by
    replaying the journal, which must therefore stay."""
    if len(data) < _HEADER.size:
        return False
    magic, version, _flags, _digest = _HEADER.unpack_from(data)
    return bool(magic == MAGIC and version == VERSION)


def loads(data: bytes) -> Vm:
    if len(data) < _HEADER.size:
        raise CorruptSnapshot("snapshot truncated (no header)")
    magic, version, _flags, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptSnapshot("not a vkmmu snapshot (bad magic)")
    if version == 1:
        raise CorruptSnapshot("a VERSION 1 (pickle) snapshot is not unpickled; replay instead")
    if version != VERSION:
        raise CorruptSnapshot(f"snapshot version {version}, this build reads {VERSION}")
    body = memoryview(data)[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptSnapshot("snapshot checksum mismatch (corrupt or truncated)")
    try:
        return _decode(body)
    except Exception as e:  # a checksum-valid body that does not decode: same outcome
        raise CorruptSnapshot(f"snapshot body does not decode: {e}") from e


def footprint(data: bytes) -> dict[str, int]:
    """What the VM in `data` holds once decoded, read from its state document and section
    headers only (nothing bulk is decompressed): page tables, written host / guest_memfd
    pages, dirty-bitmap entries, zap events. The service reserves it before a fork or a
    reload. Raises CorruptSnapshot on bytes `loads` would refuse at once."""
    if not readable(data):
        raise CorruptSnapshot("not a snapshot this build reads")
    body = memoryview(data)[_HEADER.size :]
    out = {"tables": 0, "content_pages": 0, "bitmap_entries": 0, "events": 0}
    pos = 0
    while pos < len(body):
        mlen, rlen = _SECTION.unpack_from(body, pos)
        pos += _SECTION.size
        name, _dtype, shape = bytes(body[pos : pos + mlen]).decode().split(";")
        pos += mlen
        if name == "state":
            st = json.loads(zlib.decompress(body[pos : pos + rlen]))
            m = st["mmu"]
            out["tables"] = int(m["tables_top"]) - len(m["tables_free"])
            out["events"] = len(st["events"])
            logging = {(int(a), int(b)) for a, b in st["dirty"]}
            out["bitmap_entries"] = sum(
                int(s["npages"])
                for as_id, sp in enumerate(st["spaces"])
                for s in _slots(st, sp)
                if (as_id, int(s["id"])) in logging
            )
        elif name.endswith("/keys"):
            out["content_pages"] += int(shape or 0)
        pos += rlen
    return out


_TABLE_KEYS = ("idx", "entries", "level", "gfn", "root")


def _table_chunks(
    sections: Iterator[tuple[str, Section]], rest: dict[str, Section]
) -> Iterator[dict[str, np.ndarray]]:
    """The page-table chunks, one at a time as they are decompressed (they go straight into
    the pool); every other section lands in `rest`."""
    chunk: dict[str, np.ndarray] = {}
    for name, arr in sections:
        if not name.startswith("tables/"):
            rest[name] = arr
            continue
        if not isinstance(arr, np.ndarray):
            raise ValueError("a page-table section is not an array")
        chunk[name.rsplit("/", 1)[1]] = arr
        if len(chunk) == len(_TABLE_KEYS):
            yield chunk
            chunk = {}
    if chunk:
        raise ValueError("a page-table chunk is incomplete")


def _decode(body: memoryview) -> Vm:
    sections = _sections(body)
    name, doc = next(sections)
    if name != "state" or not isinstance(doc, np.ndarray):
        raise ValueError("the state document does not come first")
    st = json.loads(doc.tobytes())
    if st.get("schema") not in READABLE_SCHEMAS:
        raise ValueError(f"state schema {st.get('schema')!r}, this build reads {READABLE_SCHEMAS}")
    vm = Vm(st["vm_type"], 0, st["paging_levels"], st["name"], st["table_budget"])
    arrays: dict[str, Section] = {}
    _decode_mmu(vm, st["mmu"], _table_chunks(sections, arrays))
    arrays.update(sections)
    vm.disabled_quirks = st["disabled_quirks"]
    vm.manual_dirty_log = st["manual_dirty_log"]
    vm.hypercall_exit_enabled = st.get("hypercall_exit_enabled", 0)
    vm.host_profile = HostProfile(**st.get("host_profile", {}))
    vm.set_engine_rev(st.get("engine_rev", 1))  # snapshots from before revisions: 1
    vm.nx_huge_pages = [(int(a), int(b)) for a, b in st.get("nx_huge_pages", [])]
    vm.zap_policy = st["zap_policy"]
    vm.destroyed = st["destroyed"]
    vm.bugged = st["bugged"]
    vm.now = st["now"]
    for v in st["vcpus"]:
        vcpu = Vcpu(v["id"])
        vcpu.as_id = v["as_id"]
        vcpu.running = v["running"]
        vcpu.roots = {RootRole(k): rid for k, rid in v["roots"].items()}
        vcpu.stats.update(v["stats"])
        vcpu.hypercall_exit = v.get("hypercall_exit")
        vm.vcpus[vcpu.id] = vcpu
    for space, sp in zip(vm.spaces, st["spaces"], strict=True):
        space.generation = sp["generation"]
        for s in _slots(st, sp):
            space.install(_slot_of(s))
    _decode_gmem(vm, st["gmem"], arrays)
    vm.attrs.private = _intervals(st["private"])
    vm.host.freed = _intervals(st["host"]["freed"])
    vm.host.thp_populated = _intervals(st["host"].get("thp_populated", []))
    vm.host.set_runs([(int(a), int(b), int(c), str(d)) for a, b, c, d in st["host"]["runs"]])
    for page, raw in _unpages(arrays["host/keys"], arrays["host/lens"], arrays["host/data"]):
        vm.host.contents[page] = bytearray(raw)
    vm.tdx = _tdx_of(st["tdx"]) if st["tdx"] is not None else None
    for i, (as_id, sid) in enumerate(st["dirty"]):
        slot = vm.spaces[as_id].get(sid)
        assert slot is not None, "a dirty bitmap without its slot"
        bits = arrays[f"dirty/{i}"]
        if not isinstance(bits, np.ndarray):
            raise ValueError("a dirty bitmap is not an array")
        # unpackbits gives 0/1 bytes: a bool view of them, not a second copy.
        vm.dirty[(as_id, sid)] = np.unpackbits(bits, count=slot.npages).view(bool)
    vm.dirty_initially_set = {(int(a), int(b)) for a, b in st["dirty_initially_set"]}
    vm.zapped = _intervals(st["zapped"])
    vm.stats_kvm.update(st["stats_kvm"])
    vm.stats_extra.update(st["stats_extra"])
    vm.events = st["events"]
    vm.event_seq = st["event_seq"]
    return vm


def _decode_gmem(vm: Vm, g: dict[str, Any], arrays: dict[str, Section]) -> None:
    vm.gmem.first_fd, vm.gmem.next_fd, vm.gmem.next_pfn = g["first_fd"], g["next_fd"], g["next_pfn"]
    for f in g["files"]:
        file = GmemFile(
            fd=f["fd"],
            size=f["size"],
            flags=f["flags"],
            owner_vm=vm.gmem.owner,
            base_pfn=f["base_pfn"],
            allocated=_intervals(f["allocated"]),
            bindings=[(int(a), int(n), (int(k[0]), int(k[1]))) for a, n, k in f["bindings"]],
            closed=f["closed"],
        )
        p = f"gmem/{file.fd}"
        file.contents = dict(
            _unpages(arrays[f"{p}/keys"], arrays[f"{p}/lens"], arrays[f"{p}/data"])
        )
        vm.gmem.files[file.fd] = file


def _decode_mmu(vm: Vm, m: dict[str, Any], chunks: Iterator[dict[str, np.ndarray]]) -> None:
    mmu = vm.mmu
    mmu.next_root_id = m["next_root_id"]
    mmu.mmu_valid_gen = m["mmu_valid_gen"]
    mmu.pages = list(m["pages"])
    mmu.count_gmem = m["count_gmem"]
    mmu.roots = {r["id"]: _root_of(r) for r in sorted(m["roots"], key=lambda r: int(r["id"]))}
    mmu.pool = TablePool.restore_chunks(m["tables_top"], m["tables_free"], chunks)


# Stats that journals from before them cannot move: left out of the digest while 0.
_NEWER_STATS = frozenset({"pml_entries", "pml_full_exits"})


def _digest_info(vm: Vm) -> dict[str, Any]:
    info = vm.info()
    del info["engine_rev"]  # the behaviour a VM replays under, not its state
    if vm.host_profile.is_default:
        del info["host"]  # digests from before host profiles stay as they were
    return info


def _digest_stats(vm: Vm) -> dict[str, Any]:
    return {k: v for k, v in vm.stats().items() if v or k not in _NEWER_STATS}


def _newer_state(vm: Vm) -> dict[str, Any]:
    """State that journals from before it cannot hold enters the digest only once it is set,
    so their digests stay as they were."""
    out: dict[str, Any] = {}
    if vm.tdx is not None and vm.tdx.lifecycle:
        out["tdx_lifecycle"] = vm.tdx.lifecycle_dict()
    if vm.hypercall_exit_enabled:
        out["hypercall_exit_enabled"] = vm.hypercall_exit_enabled
    if vm.tdx is not None and vm.tdx.map_gpa:
        out["map_gpa"] = sorted(vm.tdx.map_gpa.items())
    if vm.nx_huge_pages:
        out["nx_huge_pages"] = vm.nx_huge_pages
    exits = {v.id: v.hypercall_exit for v in vm.vcpus.values() if v.hypercall_exit is not None}
    if exits:
        out["hypercall_exits"] = sorted(exits.items())
    return out


def digest(vm: Vm) -> str:
    """A hash of everything replay must reproduce, independent of how objects are shared in
    memory: tables, then a canonical JSON of the rest of the state.
    Zap durations are wall clock and left out."""
    h = hashlib.sha256()
    for name, arr in sorted(vm.mmu.pool.export().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    events = [{k: v for k, v in ev.items() if k != "duration_us"} for ev in vm.events]
    state = {
        "info": _digest_info(vm),
        "quirks": vm.disabled_quirks,
        "manual_dirty_log": vm.manual_dirty_log,
        "vcpus": vm.vcpus_view(),
        "memslots": vm.memslots(),
        "generations": [s.generation for s in vm.spaces],
        "gmem": vm.guest_memfds(),
        "gmem_contents": {
            f.fd: {str(i): bytes(b).hex() for i, b in sorted(f.contents.items())} for f in vm.gmem
        },
        "attributes": vm.memory_attributes(),
        "host": {str(p): bytes(b).hex() for p, b in sorted(vm.host.contents.items())},
        "host_freed": vm.host.freed.to_list(),
        "host_runs": vm.host.runs(),
        "roots": vm.roots(),
        "mmu_valid_gen": vm.mmu.mmu_valid_gen,
        "stats": _digest_stats(vm),
        "events": events,
        "zapped": vm.zapped.to_list(),
        "dirty": {f"{k[0]}:{k[1]}": v.nonzero()[0].tolist() for k, v in sorted(vm.dirty.items())},
        "tdx": vm.tdx.to_dict() if vm.tdx is not None else None,
        "tdx_sets": [vm.tdx.accepted.to_list(), vm.tdx.lost.to_list()] if vm.tdx else None,
    }
    state.update(_newer_state(vm))
    h.update(json.dumps(state, sort_keys=True, default=str).encode())
    return h.hexdigest()
