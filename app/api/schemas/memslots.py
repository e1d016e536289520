"""Memslots (`struct kvm_userspace_memory_region2`) and dirty logging."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.api.schemas.common import (
    U32,
    U64,
    Answer,
    Base64Data,
    Body,
    enum_members,
    flags_schema,
    flags_validator,
)
from app.api.schemas.zaps import ZapEvent
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


class BatchRegion(MemoryRegion):
    """One call of a batch: the memslot PUT body with `slot` required."""

    slot: U32 = Field(description="The kernel's 32-bit slot: `as_id << 16 | id`.")


class MemslotBatch(Body):
    """`KVM_SET_USER_MEMORY_REGION2` calls applied in order, under one lock and one database
    transaction, stopping at the first one KVM rejects."""

    regions: list[BatchRegion] = Field(
        min_length=1, description="In order; at most `VKMMU_MAX_BATCH` (default 1024)."
    )


class BatchOutcome(Answer):
    """What became of one call of a batch."""

    slot: int
    outcome: Literal["applied", "rejected", "not_attempted"] = Field(
        description="`not_attempted`: an earlier call was rejected, so this one never ran."
    )
    change: Literal["create", "delete", "move", "flags_only", "none"] | None = Field(
        description="What an applied call changed (`none`: the region was the slot as it "
        "already was); null otherwise."
    )
    errno: int | None = Field(description="A rejected call's errno (null otherwise).")
    errno_name: str | None = Field(description="`EINVAL`, `EEXIST`, … (null unless rejected).")
    detail: str | None = Field(description="Which rule rejected the call (null unless rejected).")
    state_changed: bool | None = Field(
        description="A rejected call that still changed state, as the kernel's does (a move "
        "that zapped before failing): it was journaled. Null unless rejected."
    )


class MemslotBatchResult(Answer):
    results: list[BatchOutcome] = Field(description="One per region, in order.")
    applied: int = Field(description="Calls applied (the results before the first rejection).")


class MappedCounts(Answer):
    shared: int = Field(description="Leaf SPTEs mapping the slot in shared (direct) roots.")
    private: int = Field(description="Leaf SPTEs mapping the slot's private memory.")
    total: int


class Memslot(Answer):
    """A memslot as KVM holds it."""

    slot: int = Field(description="The kernel's 32-bit slot: `as_id << 16 | id`.")
    flags: int
    flag_names: list[str] = Field(description="`flags` as KVM_MEM_* names.")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int = Field(description="The VMM's host virtual address (HVA) of the slot.")
    guest_memfd: int
    guest_memfd_offset: int
    base_gfn: int
    npages: int
    as_id: int
    id: int
    mapped: MappedCounts
    dirty_logging: bool


class MemslotChange(Answer):
    change: Literal["create", "delete", "move", "flags_only", "none"]
    memslot: Memslot | None = Field(description="The slot after the call; null after a delete.")
    zap: ZapEvent | None = Field(description="The zap the change caused, if any.")


class DirtyLog(Answer):
    first_page: int
    num_pages: int
    bitmap: str = Field(description="base64 of little-endian u64 words, bit n = page n")
    dirty_count: int
    sptes_write_protected: int = Field(
        description="Leaves write-protected again (0 when only read: manual protect, or clean)."
    )


class DirtyLogCleared(Answer):
    cleared: int = Field(description="Dirty bits cleared.")
    sptes_write_protected: int = Field(description="Leaves write-protected again.")


class DirtyLogClear(Body):
    """`struct kvm_clear_dirty_log` (the slot is in the path)."""

    first_page: U64 = 0
    num_pages: U32
    bitmap: Base64Data
