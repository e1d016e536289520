"""What a vCPU does to memory: accesses, loads, stores, pre-fault, TDX accept."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.api.schemas.common import U64, Body, HexData, Open


class Access(Body):
    gpa: U64
    size: U64 = 4096
    access: Literal["read", "write", "exec"] = "read"
    private: bool | None = Field(
        default=None,
        description="Force a private (true) or shared (false) access; default: what the "
        "guest would do (TDX: the GPA's shared bit; SW_PROTECTED: the attributes).",
    )


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
    private: bool | None = None


class Store(Body):
    gpa: U64
    data: Annotated[HexData, Field(description="1…4096 bytes as hex.")]
    private: bool | None = None


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
