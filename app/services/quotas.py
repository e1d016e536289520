"""Per-tenant quotas, on top of the service's own budgets.

What a tenant token asks for is checked against its tenant's quotas before anything
changes (ENOMEM, 507, and nothing journaled, as for the service's budgets): live VMs,
manual snapshots, page-table bytes and content bytes (host-memory and guest_memfd pages
written) of all its VMs together, and of the in-memory copies its what-ifs build while they
run (app/services/whatif.py). Calls made by the admin are bound only by the service's
budgets. The API says which tenant is acting (`acting_tenant`, set per request); the
service never takes it from the VM, so a tenant's quota never trips an admin's call.

Byte usage is known per VM from its last call in this process, and for the VMs it has not
touched since it started from the VM rows (`summary["held"]`, written with every call):
processes sharing a database each check against what they know, which may lag the
other's calls by the calls in flight.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from app.engine.errors import KvmError

# The tenant whose token made the current request (None: the admin, or no request).
acting_tenant: ContextVar[str | None] = ContextVar("vkmmu_acting_tenant", default=None)

PAGE = 4096
TABLE_BYTES = 4096
HELD_KEY = "held"


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    max_vms: int = 100
    max_snapshots: int = 256
    page_table_bytes: int = 1024**3
    content_bytes: int = 1024**3


def held_split(vm: Any) -> dict[str, int]:
    """Page-table bytes and content bytes (host-memory and guest_memfd pages) `vm` holds."""
    pool = getattr(getattr(vm, "mmu", None), "pool", None)
    tables = int(getattr(pool, "live", 0)) * TABLE_BYTES
    content = len(getattr(getattr(vm, "host", None), "contents", None) or {}) * PAGE
    for f in (getattr(getattr(vm, "gmem", None), "files", None) or {}).values():
        content += len(getattr(f, "contents", None) or {}) * PAGE
    return {"page_table_bytes": tables, "content_bytes": content}


def too_many(what: str, have: int, limit: int, setting: str) -> KvmError:
    return KvmError(
        errno.ENOMEM,
        f"the tenant has {have} {what}, the most its quota allows ({limit}, {setting})",
    )


class TenantUsage:
    """Bytes held per VM, grouped by tenant, for the byte quotas."""

    def __init__(self, quotas: TenantQuotas) -> None:
        self.quotas = quotas
        self._lock = threading.Lock()
        self._vms: dict[str, tuple[str, int, int]] = {}  # vm -> (tenant, tables, content)
        self._loaded: set[str] = set()

    def load(self, tenant: str, rows: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        """Learn the tenant's VMs from their rows once (`rows`: (vm id, summary))."""
        if tenant in self._loaded:
            return
        found = list(rows())
        with self._lock:
            for vm_id, summary in found:
                if vm_id not in self._vms:
                    held = (summary or {}).get(HELD_KEY) or {}
                    self._vms[vm_id] = (
                        tenant,
                        int(held.get("page_table_bytes", 0)),
                        int(held.get("content_bytes", 0)),
                    )
            self._loaded.add(tenant)

    def _held(self, tenant: str) -> tuple[int, int]:
        """Page-table and content bytes the tenant's VMs and copies hold (under the lock)."""
        tables = content = 0
        for t, tb, cb in self._vms.values():
            if t == tenant:
                tables += tb
                content += cb
        return tables, content

    def check(self, tenant: str, vm_id: str, need: int) -> None:
        """ENOMEM when the call on `vm_id` may take the tenant past a byte quota."""
        with self._lock:
            tables, content = self._held(tenant)
        q = self.quotas
        if tables + need > q.page_table_bytes:
            raise KvmError(
                errno.ENOMEM,
                f"the tenant's VMs hold {tables} bytes of page tables; this call may need "
                f"{need} more, past its quota of {q.page_table_bytes} "
                "(VKMMU_TENANT_PAGE_TABLE_BYTES)",
            )
        if content + need > q.content_bytes:
            raise KvmError(
                errno.ENOMEM,
                f"the tenant's VMs hold {content} bytes of memory contents; this call may "
                f"need {need} more, past its quota of {q.content_bytes} "
                "(VKMMU_TENANT_CONTENT_BYTES)",
            )

    def reserve_copy(
        self, tenant: str, key: str, tables_bytes: int, content_bytes: int, build_tables: int
    ) -> int:
        """Count an in-memory copy of a VM (a what-if's fork) under `key` until `forget(key)`:
        its page tables and contents, ENOMEM (nothing counted) when either does not fit the
        tenant's quotas beside what its VMs and other copies hold. Returns how many of the
        `build_tables` more page tables the copy may build within the page-table quota (they
        are counted too)."""
        q = self.quotas
        with self._lock:
            tables, content = self._held(tenant)
            if tables + tables_bytes > q.page_table_bytes:
                raise KvmError(
                    errno.ENOMEM,
                    f"the tenant's VMs hold {tables} bytes of page tables; a copy of this VM "
                    f"needs {tables_bytes} more, past its quota of {q.page_table_bytes} "
                    "(VKMMU_TENANT_PAGE_TABLE_BYTES)",
                )
            if content + content_bytes > q.content_bytes:
                raise KvmError(
                    errno.ENOMEM,
                    f"the tenant's VMs hold {content} bytes of memory contents; a copy of this "
                    f"VM needs {content_bytes} more, past its quota of {q.content_bytes} "
                    "(VKMMU_TENANT_CONTENT_BYTES)",
                )
            room = (q.page_table_bytes - tables - tables_bytes) // TABLE_BYTES
            build = max(0, min(build_tables, room))
            self._vms[key] = (tenant, tables_bytes + build * TABLE_BYTES, content_bytes)
            return build

    def settle(self, tenant: str, vm_id: str, held: dict[str, int]) -> None:
        with self._lock:
            self._vms[vm_id] = (tenant, held["page_table_bytes"], held["content_bytes"])

    def forget(self, vm_id: str) -> None:
        with self._lock:
            self._vms.pop(vm_id, None)
