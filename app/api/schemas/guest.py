"""What a vCPU does to memory: accesses, loads, stores, pre-fault, TDX accept."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.api.schemas.common import U64, Body, HexData, Open

# The engine only checks the flag (`_check_private_hint`); what is private comes from the
# GPA (TDX) or the memory attributes (SW_PROTECTED), never from the flag.
Private = Annotated[
    bool | None,
    Field(
        description="Optional check, not a switch: on a TD it must agree with the GPA's shared "
        "bit (EINVAL otherwise); a DEFAULT VM accepts only false; on SW_PROTECTED KVM takes "
        "privacy from the memory attributes, so the flag is accepted and ignored."
    ),
]


class Access(Body):
    gpa: U64
    size: U64 = 4096
    access: Literal["read", "write", "exec"] = "read"
    private: Private = None


class Exit(Open):
    reason: str = Field(description="KVM_EXIT_MMIO, KVM_EXIT_MEMORY_FAULT, …")


class AccessResult(Open):
    pages: int
    mapped: int
    spurious: int
    refaults: int
    levels: dict[str, int]
    exit: Exit | None


class Load(Body):
    gpa: U64
    len: Annotated[U64, Field(description="Bytes, 1…4096 (else EINVAL, as the engine rules).")]
    private: Private = None


class Store(Body):
    gpa: U64
    data: Annotated[HexData, Field(description="1…4096 bytes as hex.")]
    private: Private = None


class LoadStoreResult(Open):
    """`{"data": hex}` for a load, `{}` for a store, or `{"exit": {…}}`."""

    data: str | None = None
    exit: Exit | None = None


class PreFault(Body):
    """`struct kvm_pre_fault_memory`."""

    gpa: U64
    size: U64
    flags: U64 = 0


class PreFaultResult(Open):
    gpa: int
    size: int


class Accept(Body):
    gpa: U64
    size: U64 = 4096


def engine(model: Body, **extra: Any) -> dict[str, Any]:
    return {**model.model_dump(), **extra}
