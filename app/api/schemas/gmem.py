"""guest_memfd files (`struct kvm_create_guest_memfd`, fallocate, reads/writes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from app.api.schemas.common import (
    U32,
    U64,
    Body,
    HexData,
    Open,
    enum_members,
    flags_schema,
    flags_validator,
)
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


class GuestMemfd(Open):
    fd: int


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


class Data(Open):
    data: str = Field(description="bytes as hex")
