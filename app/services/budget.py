"""Memory accounting: what each VM holds, reserved before a call allocates.

One ledger per service: per VM, the bytes it held after its last call (page tables, dirty
bitmaps, host-memory and guest_memfd contents, zap events) plus what calls in flight have
reserved. A call first reserves its worst case (`op_need`); past the VM's quota or the
service's budget it answers ENOMEM (507) before the engine runs, so nothing changes and
nothing is journaled (replay never consults the ledger). Reservations are taken under one
lock: calls on different VMs running at once can never pass the budget together. Reloads
and forks are counted as soon as their state is built.

The sizes are read from the engine's structures here, from the service side; an engine
without them (a test double) holds nothing.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from app.engine.errors import KvmError
from app.engine.gmem import supported_gmem_flags

PAGE = 4096
TABLE_BYTES = 4096
# What one recorded zap event costs in memory (a dict of ~20 small values), at most.
ZAP_EVENT_BYTES = 2048
# Zap events one call may record, at most, before the engine trims its list.
ZAP_EVENTS_PER_CALL = 8
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
_LOFF_MAX = (1 << 63) - 1
# The engine's per-call bounds (app/engine/vm.py; past them it answers E2BIG/EINVAL): a worst
# case never exceeds them, so a call with bad arguments keeps the kernel's errno unless the
# VM really is near its budget.
MAX_ACCESS_BYTES = 1 << 40
MAX_DATA_BYTES = 1 << 20
MAX_GUEST_ACCESS_BYTES = 4096
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
# Calls whose page-table worst case is known: the range they fault (`size`, `len`, `data`).
_FAULT_OPS = frozenset({"access", "pre_fault", "accept", "load", "store"})

DEFAULT_MEMORY_BUDGET_BYTES = 8 * 1024**3
DEFAULT_VM_MEMORY_BUDGET_BYTES = 4 * 1024**3
DEFAULT_MAX_GUEST_MEMFD_BYTES = 1024**4  # 1 TiB


def bytes_held(vm: Any) -> int:
    """The memory `vm` holds that a client made it allocate."""
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


def op_need(vm: Any, op: str, args: dict[str, Any], *, max_gmem_bytes: int) -> int:
    """The most bytes `op` may make `vm` allocate (an upper bound; 0 when it only frees or
    its cost is already bounded elsewhere). Raises ENOMEM for a guest_memfd past the limit."""
    need = ZAP_EVENTS_PER_CALL * ZAP_EVENT_BYTES
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
    if op in _FAULT_OPS:
        size = min(_int(args.get("size", PAGE)), MAX_ACCESS_BYTES)
        if op in ("load", "store"):
            size = MAX_GUEST_ACCESS_BYTES  # one guest load or store: 1 to 4096 bytes
        pages = _pages(size)
        levels = int(getattr(vm, "paging_levels", 5))
        tables = -(-pages // 512) + -(-pages // (512 * 512)) + levels - 1
        need += tables * TABLE_BYTES
        if op == "store":  # a store also writes host or guest_memfd contents
            need += pages * PAGE + 2 * PAGE
    return need


class Ledger:
    """Bytes held and reserved, per VM, against a per-VM quota and a service budget."""

    def __init__(self, service_bytes: int, vm_bytes: int) -> None:
        self.service_bytes = service_bytes
        self.vm_bytes = vm_bytes
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._reserved: dict[str, int] = {}

    def total(self) -> int:
        with self._lock:
            return sum(self._held.values()) + sum(self._reserved.values())

    def of(self, vm_id: str) -> int:
        with self._lock:
            return self._held.get(vm_id, 0) + self._reserved.get(vm_id, 0)

    def reserve(self, vm_id: str, need: int) -> int:
        """Reserve `need` bytes for a call on `vm_id`, or raise ENOMEM (nothing reserved)."""
        need = max(0, need)
        with self._lock:
            mine = self._held.get(vm_id, 0) + self._reserved.get(vm_id, 0)
            total = sum(self._held.values()) + sum(self._reserved.values())
            if mine + need > self.vm_bytes:
                raise KvmError(
                    errno.ENOMEM,
                    f"the VM holds {mine} bytes; this call may need {need} more, past its "
                    f"quota of {self.vm_bytes} (VKMMU_VM_MEMORY_BUDGET_BYTES)",
                )
            if total + need > self.service_bytes:
                raise KvmError(
                    errno.ENOMEM,
                    f"the service holds {total} bytes; this call may need {need} more, past "
                    f"its budget of {self.service_bytes} (VKMMU_MEMORY_BUDGET_BYTES)",
                )
            self._reserved[vm_id] = self._reserved.get(vm_id, 0) + need
        return need

    def settle(self, vm_id: str, reserved: int, held: int) -> None:
        """A call ended: drop its reservation, record what the VM holds now."""
        with self._lock:
            left = self._reserved.get(vm_id, 0) - reserved
            if left > 0:
                self._reserved[vm_id] = left
            else:
                self._reserved.pop(vm_id, None)
            self._held[vm_id] = max(0, held)

    def forget(self, vm_id: str) -> None:
        """The VM left memory (evicted, discarded, deleted)."""
        with self._lock:
            self._held.pop(vm_id, None)
