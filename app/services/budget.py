"""Memory accounting: what each VM holds, reserved before a call allocates.

One ledger per service: per VM (or what-if fork), the bytes it held after its last call
(page tables, dirty bitmaps, host-memory and guest_memfd contents, zap events) plus what
calls in flight have reserved, against the VM's quota, the service's memory budget and the
service's page-table budget (in tables). A call first reserves its worst case (`op_need`);
past a limit it answers ENOMEM (507) before the engine runs, so nothing changes and nothing
is journaled (replay never consults the ledger). Page tables are granted, not only checked:
the engine may allocate at most the tables the call reserved (the grant is its table
budget, journaled with it). A fault needs its worst case whole; an eager split takes what
is free and stops there, as the kernel's does when no page can be allocated. Reservations
are taken under one lock: calls on different VMs running at once can never pass a budget
together. A reload or a fork reserves the state it is about to build (the VM row's last
count, or the snapshot's footprint) before building it.

The sizes are read from the engine's structures here, from the service side; an engine
without them (a test double) holds nothing.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import Any

from app.engine.dirty import split_tables_needed
from app.engine.errors import KvmError
from app.engine.gmem import supported_gmem_flags

PAGE = 4096
TABLE_BYTES = 4096
# What one recorded zap event costs in memory (a dict of ~20 small values), at most.
ZAP_EVENT_BYTES = 2048
# Zap events one call may record, at most, before the engine trims its list.
ZAP_EVENTS_PER_CALL = 8
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_USER_MEM_SLOTS = 32767
_LOFF_MAX = (1 << 63) - 1
# The engine's per-call bounds (app/engine/vm.py; past them it answers E2BIG/EINVAL): a worst
# case never exceeds them, so a call with bad arguments keeps the kernel's errno unless the
# VM really is near its budget.
MAX_ACCESS_BYTES = 1 << 40
MAX_DATA_BYTES = 1 << 20
MAX_GUEST_ACCESS_BYTES = 4096
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
MAX_INIT_MEM_PAGES = 1 << 18  # pages one KVM_TDX_INIT_MEM_REGION call may add
# Calls whose page-table worst case is known: the range they fault (`size`, `len`, `data`).
_FAULT_OPS = frozenset({"access", "pre_fault", "accept", "load", "store"})

DEFAULT_MEMORY_BUDGET_BYTES = 8 * 1024**3
DEFAULT_VM_MEMORY_BUDGET_BYTES = 4 * 1024**3
DEFAULT_MAX_GUEST_MEMFD_BYTES = 1024**4  # 1 TiB


@dataclass(frozen=True)
class Need:
    """What a call may make a VM allocate: `bytes` besides page tables, and up to `tables`
    page tables (all of them or ENOMEM when `all_tables`; else what is free)."""

    bytes: int = 0
    tables: int = 0
    all_tables: bool = True


@dataclass(frozen=True)
class Grant:
    """What the ledger reserved for one call: bytes (tables included) and page tables."""

    bytes: int = 0
    tables: int = 0


def tables_held(vm: Any) -> int:
    return int(getattr(getattr(getattr(vm, "mmu", None), "pool", None), "live", 0))


def bytes_held(vm: Any) -> int:
    """The memory `vm` holds that a client made it allocate."""
    try:  # the engine's VM: every part there (a batch asks this at each of its steps)
        mmu = vm.mmu
        total = mmu.pool.live * TABLE_BYTES + mmu.trace.nbytes
        total += sum(bitmap.nbytes for bitmap in vm.dirty.values())
        total += len(vm.host.contents) * PAGE
        total += sum(len(f.contents) for f in vm.gmem.files.values()) * PAGE
        return int(total + len(vm.events) * ZAP_EVENT_BYTES)
    except (AttributeError, TypeError):
        return _bytes_held_of_parts(vm)


def _bytes_held_of_parts(vm: Any) -> int:
    """`bytes_held` of a VM some of whose parts may be missing (a test double)."""
    total = 0
    mmu = getattr(vm, "mmu", None)
    pool = getattr(mmu, "pool", None)
    total += int(getattr(pool, "live", 0)) * TABLE_BYTES
    for bitmap in (getattr(vm, "dirty", None) or {}).values():
        total += int(getattr(bitmap, "nbytes", 0))
    host = getattr(vm, "host", None)
    total += len(getattr(host, "contents", None) or {}) * PAGE
    gmem = getattr(vm, "gmem", None)
    for f in (getattr(gmem, "files", None) or {}).values():
        total += len(getattr(f, "contents", None) or {}) * PAGE
    total += len(getattr(vm, "events", None) or ()) * ZAP_EVENT_BYTES
    total += int(getattr(getattr(mmu, "trace", None), "nbytes", 0))
    return total


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return 0
    return 0


def _pages(nbytes: int) -> int:
    return -(-max(0, nbytes) // PAGE)


def footprint_need(counts: dict[str, int]) -> Need:
    """The memory a snapshot's state holds once decoded (`codec.footprint`), as a Need."""
    other = (
        int(counts.get("content_pages", 0)) * PAGE
        + int(counts.get("bitmap_entries", 0))
        + int(counts.get("events", 0)) * ZAP_EVENT_BYTES
    )
    return Need(other, int(counts.get("tables", 0)))


# What a snapshot adds beyond the state it encodes, at most: its header, section headers,
# the state document's text besides zap events and zlib's worst-case growth.
SNAPSHOT_OVERHEAD_BYTES = 256 * 1024


def snapshot_need(vm: Any, *, copied: bool = False) -> Need:
    """The bytes of a snapshot of `vm` while it is written and stored: never more than the
    state it encodes (pages, bitmaps, tables; compressed) plus `SNAPSHOT_OVERHEAD_BYTES`;
    `copied`: plus the copy of that state it is encoded from (`codec.capture`)."""
    held = bytes_held(vm)
    return Need(held * (2 if copied else 1) + SNAPSHOT_OVERHEAD_BYTES)


def _split_need(vm: Any, op: str, args: dict[str, Any]) -> int:
    """Tables an eager split by this call may allocate at most: turning dirty logging on
    (a flags-only change of a slot) or KVM_CLEAR_DIRTY_LOG with KVM_DIRTY_LOG_INITIALLY_SET."""
    if not hasattr(vm, "mmu"):
        return 0
    if op == "set_user_memory_region" and not _int(args.get("flags")) & KVM_MEM_LOG_DIRTY_PAGES:
        return 0  # no dirty logging: no eager split (most memslot calls)
    slot = _int(args.get("slot"))
    as_id, sid = slot >> 16, slot & 0xFFFF
    if not 0 <= as_id < int(getattr(vm, "nr_as", 1)) or sid >= KVM_USER_MEM_SLOTS:
        return 0
    if op == "set_user_memory_region":
        start = _int(args.get("guest_phys_addr")) >> 12
        end = start + _pages(_int(args.get("memory_size")))
    else:
        mine = vm.spaces[as_id].get(sid)
        if mine is None:
            return 0
        start, end = mine.base_gfn, mine.end_gfn
    return split_tables_needed(vm, as_id, start, end)


def op_need(vm: Any, op: str, args: dict[str, Any], *, max_gmem_bytes: int) -> Need:
    """The most `op` may make `vm` allocate (an upper bound; nothing when it only frees or
    its cost is already bounded elsewhere). Raises ENOMEM for a guest_memfd past the limit."""
    need = ZAP_EVENTS_PER_CALL * ZAP_EVENT_BYTES
    levels = int(getattr(vm, "paging_levels", 5))
    # Only faults (an MMIO SPTE included) and eager splits build page tables.
    tables = 0
    if op == "create_guest_memfd":
        size, flags = _int(args.get("size")), _int(args.get("flags", 0))
        # Only a file KVM would create (valid flags, a positive page-aligned loff_t size) meets
        # the limit: anything else keeps the kernel's EINVAL, in the kernel's order.
        valid = (
            not flags & ~supported_gmem_flags(getattr(vm, "vm_type", None))
            and 0 < size <= _LOFF_MAX
            and size % PAGE == 0
        )
        if valid and size > max_gmem_bytes:
            raise KvmError(
                errno.ENOMEM,
                f"guest_memfd of {size} bytes: the service's limit is {max_gmem_bytes} "
                "(VKMMU_MAX_GUEST_MEMFD_BYTES)",
            )
    elif op == "set_user_memory_region":
        if _int(args.get("flags")) & KVM_MEM_LOG_DIRTY_PAGES:
            # A byte per page of bitmap.
            need += min(_pages(_int(args.get("memory_size"))), KVM_MEM_MAX_NR_PAGES)
    elif op in ("host_write", "gmem_write"):
        data = args.get("data")
        # Hex or base64 text: never more bytes than characters; two pages of rounding.
        nbytes = min(len(data) if isinstance(data, str) else 0, MAX_DATA_BYTES)
        need += _pages(nbytes) * PAGE + 2 * PAGE
    if op == "tdx_init_mem_region":
        # KVM_TDX_INIT_MEM_REGION maps each page it adds (tables as a fault over the range)
        # and copies the source page into guest_memfd.
        pages = min(_int(args.get("nr_pages")), MAX_INIT_MEM_PAGES)
        tables += -(-pages // 512) + -(-pages // (512 * 512)) + levels - 1 + 1
        return Need(need + pages * PAGE, tables)
    if op in _FAULT_OPS:
        size = min(_int(args.get("size", PAGE)), MAX_ACCESS_BYTES)
        if op in ("load", "store"):
            size = MAX_GUEST_ACCESS_BYTES  # one guest load or store: 1 to 4096 bytes
        pages = _pages(size)
        # Leaf tables, one path per level above them (the engine's own bound), and a root.
        tables += -(-pages // 512) + -(-pages // (512 * 512)) + levels - 1 + 1
        if op == "store":  # a store also writes host or guest_memfd contents
            need += pages * PAGE + 2 * PAGE
        return Need(need, tables)
    if op in ("set_user_memory_region", "clear_dirty_log"):
        split = _split_need(vm, op, args)
        if split:
            return Need(need, tables + split, all_tables=False)
    return Need(need, tables)


class _Book:
    """Amounts per VM and their sum, kept up to date as they change: every call reads the
    sums, and summing over all VMs each time would cost O(VMs) per call."""

    __slots__ = ("by_vm", "total")

    def __init__(self) -> None:
        self.by_vm: dict[str, int] = {}
        self.total = 0

    def get(self, vm_id: str) -> int:
        return self.by_vm.get(vm_id, 0)

    def set(self, vm_id: str, amount: int) -> None:
        self.total += amount - self.by_vm.get(vm_id, 0)
        if amount:
            self.by_vm[vm_id] = amount
        else:
            self.by_vm.pop(vm_id, None)


class Ledger:
    """Bytes and page tables held and reserved, per VM (or fork), against a per-VM quota,
    the service's memory budget and its page-table budget."""

    def __init__(
        self, service_bytes: int, vm_bytes: int, service_tables: int | None = None
    ) -> None:
        self.service_bytes = service_bytes
        self.vm_bytes = vm_bytes
        self.service_tables = (
            service_bytes // TABLE_BYTES if service_tables is None else service_tables
        )
        self._lock = threading.Lock()
        self._held = _Book()
        self._reserved = _Book()
        self._held_tables = _Book()
        self._reserved_tables = _Book()

    def total(self) -> int:
        with self._lock:
            return self._held.total + self._reserved.total

    def tables(self) -> int:
        """Page tables held and reserved by everyone."""
        with self._lock:
            return self._held_tables.total + self._reserved_tables.total

    def held(self, vm_id: str) -> int:
        """What `vm_id` held when it last settled (its reservations not included)."""
        with self._lock:
            return self._held.get(vm_id)

    def of(self, vm_id: str) -> int:
        with self._lock:
            return self._held.get(vm_id) + self._reserved.get(vm_id)

    def free_tables(self, vm_id: str) -> int:
        """Page tables a call on `vm_id` could be granted now."""
        with self._lock:
            mine = self._held.get(vm_id) + self._reserved.get(vm_id)
            total = self._held.total + self._reserved.total
            tables = self._held_tables.total + self._reserved_tables.total
            return max(
                0,
                min(
                    (self.vm_bytes - mine) // TABLE_BYTES,
                    (self.service_bytes - total) // TABLE_BYTES,
                    self.service_tables - tables,
                ),
            )

    def reserve(self, vm_id: str, need: Need | int) -> Grant:
        """Reserve what a call on `vm_id` may allocate, or raise ENOMEM (nothing reserved)."""
        if isinstance(need, int):
            need = Need(need)
        other = max(0, need.bytes)
        with self._lock:
            mine = self._held.get(vm_id) + self._reserved.get(vm_id)
            total = self._held.total + self._reserved.total
            if mine + other > self.vm_bytes:
                raise _enomem(
                    f"the VM holds {mine} bytes; this call may need {other} more, past "
                    f"its quota of {self.vm_bytes} (VKMMU_VM_MEMORY_BUDGET_BYTES)"
                )
            if total + other > self.service_bytes:
                raise _enomem(
                    f"the service holds {total} bytes; this call may need {other} "
                    f"more, past its budget of {self.service_bytes} (VKMMU_MEMORY_BUDGET_BYTES)"
                )
            tables_now = self._held_tables.total + self._reserved_tables.total
            room = min(
                (self.vm_bytes - mine - other) // TABLE_BYTES,
                (self.service_bytes - total - other) // TABLE_BYTES,
                self.service_tables - tables_now,
            )
            tables = max(0, min(need.tables, room))
            if need.all_tables and tables < need.tables:
                raise _enomem(
                    f"this call may build {need.tables} page tables; {max(0, room)} are left "
                    "in the VM's quota and the service's budgets (VKMMU_VM_MEMORY_BUDGET_BYTES, "
                    "VKMMU_MEMORY_BUDGET_BYTES, VKMMU_PAGE_TABLE_BUDGET_BYTES)"
                )
            grant = Grant(other + tables * TABLE_BYTES, tables)
            self._reserved.set(vm_id, self._reserved.get(vm_id) + grant.bytes)
            self._reserved_tables.set(vm_id, self._reserved_tables.get(vm_id) + tables)
        return grant

    def settle(self, vm_id: str, reserved: Grant, held: int, held_tables: int = 0) -> None:
        """A call ended (or a state was built): drop its reservation, record what the VM
        holds now."""
        with self._lock:
            for book, amount in (
                (self._reserved, reserved.bytes),
                (self._reserved_tables, reserved.tables),
            ):
                book.set(vm_id, max(0, book.get(vm_id) - amount))
            self._held.set(vm_id, max(0, held))
            self._held_tables.set(vm_id, max(0, held_tables))

    def forget(self, vm_id: str) -> None:
        """The VM left memory (evicted, discarded, deleted)."""
        with self._lock:
            self._held.set(vm_id, 0)
            self._held_tables.set(vm_id, 0)


def _enomem(detail: str) -> KvmError:
    return KvmError(errno.ENOMEM, detail)
