"""Engine state to bytes and back (snapshots).

Layout: MAGIC (8) | version u32 | flags u32 | sha256 of the body (32) | body.
Body: zlib-compressed pieces. Page-table pages are delta-encoded along each row first (a run
of leaves differs by one pfn step, so rows compress to almost nothing, and fast); the rest of
the state is small and is pickled. The checksum is verified before anything is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np

from .paging import TablePool

if TYPE_CHECKING:
    from .vm import Vm

MAGIC = b"VKMMUSN\x00"
VERSION = 1
_HEADER = struct.Struct("<8sII32s")


class CorruptSnapshot(ValueError):
    """The bytes are not a snapshot this version can load (bad magic, version or checksum)."""


def _pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        if name == "entries" and a.size:
            flat = a.ravel()
            d = np.empty_like(flat)
            d[0] = flat[0]
            np.subtract(flat[1:], flat[:-1], out=d[1:])  # uint64 wraps: exact round trip
            a = d.reshape(a.shape)
        raw = zlib.compress(memoryview(a).cast("B") if a.size else b"", 1)  # type: ignore[arg-type]
        meta = f"{name};{a.dtype.str};{','.join(map(str, a.shape))}".encode()
        out.write(struct.pack("<IQ", len(meta), len(raw)))
        out.write(meta)
        out.write(raw)
    return out.getvalue()


def _unpack_arrays(buf: memoryview) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    while pos < len(buf):
        mlen, rlen = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        name, dtype, shape_s = bytes(buf[pos : pos + mlen]).decode().split(";")
        pos += mlen
        shape = tuple(int(x) for x in shape_s.split(",") if x)
        a = np.frombuffer(zlib.decompress(buf[pos : pos + rlen]), dtype=np.dtype(dtype))
        a = a.reshape(shape).copy()
        pos += rlen
        if name == "entries" and a.size:
            flat = a.ravel()
            np.cumsum(flat, dtype=np.uint64, out=flat)
        arrays[name] = a
    return arrays


def dumps(vm: Vm) -> bytes:
    pool = vm.mmu.pool
    vm.mmu.pool = None  # type: ignore[assignment]
    try:
        state = zlib.compress(pickle.dumps(vm, protocol=pickle.HIGHEST_PROTOCOL), 1)
    finally:
        vm.mmu.pool = pool
    tables = _pack_arrays(pool.export())
    body = struct.pack("<Q", len(state)) + state + tables
    digest = hashlib.sha256(body).digest()
    return _HEADER.pack(MAGIC, VERSION, 0, digest) + body


def loads(data: bytes) -> Vm:
    if len(data) < _HEADER.size:
        raise CorruptSnapshot("snapshot truncated (no header)")
    magic, version, _flags, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptSnapshot("not a vkmmu snapshot (bad magic)")
    if version != VERSION:
        raise CorruptSnapshot(f"snapshot version {version}, this build reads {VERSION}")
    body = memoryview(data)[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptSnapshot("snapshot checksum mismatch (corrupt or truncated)")
    try:
        (slen,) = struct.unpack_from("<Q", body)
        vm = pickle.loads(zlib.decompress(body[8 : 8 + slen]))
        vm.mmu.pool = TablePool.restore(_unpack_arrays(body[8 + slen :]))
    except Exception as e:  # a checksum-valid body that does not decode: same outcome
        raise CorruptSnapshot(f"snapshot body does not decode: {e}") from e
    return vm


def digest(vm: Vm) -> str:
    """A hash of everything replay must reproduce, independent of how objects are shared in
    memory (pickle bytes are not): tables, then a canonical JSON of the rest of the state.
    Zap durations are wall clock and left out."""
    h = hashlib.sha256()
    for name, arr in sorted(vm.mmu.pool.export().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    events = [{k: v for k, v in ev.items() if k != "duration_us"} for ev in vm.events]
    state = {
        "info": vm.info(),
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
        "stats": vm.stats(),
        "events": events,
        "zapped": vm.zapped.to_list(),
        "dirty": {f"{k[0]}:{k[1]}": v.nonzero()[0].tolist() for k, v in sorted(vm.dirty.items())},
        "tdx": vm.tdx.to_dict() if vm.tdx is not None else None,
        "tdx_sets": [vm.tdx.accepted.to_list(), vm.tdx.lost.to_list()] if vm.tdx else None,
    }
    h.update(json.dumps(state, sort_keys=True, default=str).encode())
    return h.hexdigest()
