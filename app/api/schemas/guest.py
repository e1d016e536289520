"""What a vCPU does to memory: accesses, loads, stores, pre-fault, TDX accept."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.api.schemas.common import U64, Answer, Body, HexData, LevelCounts

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


class MmioExit(Answer):
    """`struct kvm_run` `mmio`: the access hit no memslot (or an MMIO SPTE)."""

    reason: Literal["KVM_EXIT_MMIO"]
    gpa: int
    len: int
    is_write: bool


class InternalErrorExit(Answer):
    """`struct kvm_run` `internal` (exit 17): an instruction fetch from a GPA without a
    memslot cannot be emulated (handle_emulation_failure, CPL 0)."""

    reason: Literal["KVM_EXIT_INTERNAL_ERROR"]
    suberror: int = Field(description="KVM_INTERNAL_ERROR_EMULATION (1).")
    suberror_name: str


class MemoryFaultExit(Answer):
    """`struct kvm_run` `memory_fault` (KVM_CAP_MEMORY_FAULT_INFO): the VMM must act, e.g.
    convert the range (flags has KVM_MEMORY_EXIT_FLAG_PRIVATE for a private access)."""

    reason: Literal["KVM_EXIT_MEMORY_FAULT"]
    gpa: int
    size: int
    flags: int


Exit = Annotated[MmioExit | MemoryFaultExit | InternalErrorExit, Field(discriminator="reason")]


class AccessResult(Answer):
    pages: int = Field(description="Pages the access went through before stopping.")
    mapped: int = Field(description="Pages that got a new leaf SPTE.")
    spurious: int
    refaults: int = Field(description="Pages faulted again after a zap had emptied them.")
    write_protect_fixed: int = Field(description="Write-protected leaves made writable.")
    levels: LevelCounts = Field(description="New leaves by mapping level.")
    exit: Exit | None = Field(description="The exit that stopped the access, or null.")


class Load(Body):
    gpa: U64
    len: Annotated[U64, Field(description="Bytes, 1…4096 (else EINVAL, as the engine rules).")]
    private: Private = None


class Store(Body):
    gpa: U64
    data: Annotated[HexData, Field(description="1…4096 bytes as hex.")]
    private: Private = None


class LoadResult(Answer):
    """The bytes read, or the exit that stopped the load (then `data` is null)."""

    data: str | None = Field(description="The bytes as hex; null when the load exited.")
    exit: Exit | None


class StoreResult(Answer):
    exit: Exit | None = Field(description="The exit that stopped the store, or null.")


class PreFault(Body):
    """`struct kvm_pre_fault_memory`."""

    gpa: U64
    size: U64
    flags: U64 = 0


class PreFaultResult(Answer):
    """`struct kvm_pre_fault_memory` after the call: what is left (size 0: all done)."""

    gpa: int
    size: int


class AcceptResult(Answer):
    accepted: int = Field(description="Pages accepted by this call.")
    reaccepted: int = Field(description="Of them, pages accepted again after a zap.")
    exit: Exit | None


class Accept(Body):
    gpa: U64
    size: U64 = 4096


def engine(model: Body, **extra: Any) -> dict[str, Any]:
    return {**model.model_dump(), **extra}
