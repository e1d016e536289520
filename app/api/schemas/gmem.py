"""guest_memfd files (`struct kvm_create_guest_memfd`, fallocate, reads/writes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from app.api.schemas.common import (
    U32,
    U64,
    Answer,
    Body,
    HexData,
    enum_members,
    flags_schema,
    flags_validator,
)
from app.api.schemas.zaps import ZapEvent
from app.engine import uapi

_GMEM_FLAGS = enum_members(uapi.GmemFlag)
GmemFlags = Annotated[
    int,
    flags_validator(_GMEM_FLAGS, 64),
    flags_schema(_GMEM_FLAGS, 64, "GUEST_MEMFD_FLAG_* flags"),
]


class GmemCreate(Body):
    size: U64
    flags: GmemFlags = 0


class GmemBinding(Answer):
    offset: int = Field(description="Byte offset in the file.")
    npages: int
    as_id: int = Field(description="The bound memslot's address space.")
    id: int = Field(description="The bound memslot's id in that address space.")


class GuestMemfd(Answer):
    fd: int
    size: int
    flags: int
    flag_names: list[str]
    base_pfn: int = Field(description="The pfn of the file's first page.")
    allocated_pages: int
    allocated: list[list[int]] = Field(
        description="Runs of allocated pages `[first, end)` (page indexes), the first 1000."
    )
    allocated_runs: int = Field(description="How many runs there are in all.")
    bindings: list[GmemBinding]
    closed: bool


class FallocateResult(Answer):
    allocated: int | None = Field(description="`allocate`: pages newly allocated; else null.")
    freed: int | None = Field(description="`punch_hole`: allocated pages freed; else null.")
    zap: ZapEvent | None = Field(description="The zap of the punched range's mappings.")


class GmemClosed(Answer):
    zap: ZapEvent | None = Field(description="The zap of every SPTE mapping the file's pages.")


class Written(Answer):
    written: int = Field(description="Bytes written.")


class Fallocate(Body):
    mode: Literal["allocate", "punch_hole"] | U32 = Field(
        description="`allocate` (FALLOC_FL_KEEP_SIZE), `punch_hole` (PUNCH_HOLE|KEEP_SIZE), or "
        "raw fallocate(2) mode bits (KVM answers EOPNOTSUPP for the ones it refuses)."
    )
    offset: U64
    len: U64


class GmemRead(Body):
    offset: U64
    len: Annotated[U64, Field(description="Bytes; at most 1 MiB at once.")]


class GmemWrite(Body):
    offset: U64
    data: HexData


class Data(Answer):
    data: str = Field(description="bytes as hex")
