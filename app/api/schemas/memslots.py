"""Memslots (`struct kvm_userspace_memory_region2`) and dirty logging."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.api.schemas.common import (
    U32,
    U64,
    Base64Data,
    Body,
    Open,
    enum_members,
    flags_schema,
    flags_validator,
)
from app.engine import uapi

_MEM_FLAGS = enum_members(uapi.MemFlag)
MemFlags = Annotated[
    int,
    flags_validator(_MEM_FLAGS, 32),
    flags_schema(_MEM_FLAGS, 32, "KVM_MEM_* flags"),
]


class MemoryRegion(Body):
    """The body of `PUT …/memslots/{slot}`: the kernel struct's fields but `slot`, which is
    in the path (it may be repeated here; it must then agree). The three fields that place
    the slot are required: a body missing one is a 422, never a delete. An explicit
    `"memory_size": 0` deletes the slot, as the ioctl does."""

    slot: U32 | None = Field(default=None, description="Optional; must equal the path's slot.")
    flags: MemFlags = 0
    guest_phys_addr: U64
    memory_size: Annotated[U64, Field(description="Bytes; an explicit 0 deletes the slot.")]
    userspace_addr: U64
    guest_memfd: Annotated[U32, Field(description="A guest_memfd fd of this VM.")] = 0
    guest_memfd_offset: U64 = 0

    def engine_args(self, slot: int) -> dict[str, Any]:
        return {
            "slot": slot,
            "flags": self.flags,
            "guest_phys_addr": self.guest_phys_addr,
            "memory_size": self.memory_size,
            "userspace_addr": self.userspace_addr,
            "guest_memfd": self.guest_memfd,
            "guest_memfd_offset": self.guest_memfd_offset,
        }


class Memslot(Open):
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int
    guest_memfd_offset: int
    base_gfn: int
    npages: int
    as_id: int
    id: int


class ZapSummary(Open):
    """What a zap did: `path` (`zap_all_fast`, `zap_slot_leafs`, …), `sptes_zapped` by level
    (per root where roots differ), `tlb_flushes`, `roots_invalidated`, …"""

    path: str | None = None


class MemslotChange(Open):
    change: Literal["create", "delete", "move", "flags_only", "none"]
    memslot: Memslot | None
    zap: ZapSummary | None


class DirtyLog(Open):
    first_page: int
    num_pages: int
    bitmap: str = Field(description="base64 of little-endian u64 words, bit n = page n")
    dirty_count: int


class DirtyLogClear(Body):
    """`struct kvm_clear_dirty_log` (the slot is in the path)."""

    first_page: U64 = 0
    num_pages: U32
    bitmap: Base64Data
