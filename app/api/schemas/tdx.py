"""A TD's lifecycle: the KVM_TDX_* commands (kvm-private-tdx.md §5.1, docs/engine.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, create_model

from app.api.schemas.common import U64, Answer, Body
from app.engine.tdx import LIFECYCLE_OPS

TdxLifecycleOps: type[Answer] = create_model(  # type: ignore[call-overload]
    "TdxLifecycleOps",
    __base__=Answer,
    __doc__="The TD's lifecycle SEAMCALLs (measurement included), by the TDX module's names.",
    **{
        op.lower().replace(".", "_"): (int, Field(alias=op, description=f"{op} count"))
        for op in LIFECYCLE_OPS
    },
)


class TdxLifecycle(Answer):
    td_state: Literal["uninitialized", "initialized", "runnable"] = Field(
        description="kvm_tdx->state: KVM_TDX_INIT_VM initialises, KVM_TDX_FINALIZE_VM makes "
        "the TD runnable. A TD created without `td_lifecycle` is runnable from creation."
    )
    vcpus_initialized: list[int] | None = Field(
        description="vCPUs that went through KVM_TDX_INIT_VCPU; null: every vCPU (a TD "
        "created without `td_lifecycle`)."
    )
    attributes: int = Field(description="TD attributes given to KVM_TDX_INIT_VM.")
    gpaw: int = Field(description="Guest physical address width (48 or 52); 0 before INIT_VM.")
    ops: TdxLifecycleOps  # type: ignore[valid-type]


class TdxInitVm(Body):
    attributes: U64 = Field(
        description="TD attributes: only SEPT_VE_DISABLE (1 << 28) is supported (0: none)."
    )
    gpaw: Annotated[
        int | None,
        Field(
            ge=0,
            le=255,
            description="CPUID 0x8000_0008 EAX[23:16]: 48 (4-level EPT) or 52 (5-level); "
            "null: the VM's paging levels decide.",
        ),
    ] = None
    flags: U64 = Field(default=0, description="kvm_tdx_cmd.flags: must be 0.")


class TdxInitVcpu(Body):
    rcx: U64 = Field(default=0, description="The vCPU's initial RCX (kvm_tdx_cmd.data).")
    flags: U64 = Field(default=0, description="kvm_tdx_cmd.flags: must be 0.")


class TdxInitMemRegion(Body):
    source_addr: U64 = Field(description="Host (VMM) address of the source pages.")
    gpa: U64 = Field(description="Private GPA the pages are added at.")
    nr_pages: U64
    flags: U64 = Field(default=0, description="KVM_TDX_MEASURE_MEMORY_REGION (1): measure.")


class TdxMemRegion(Answer):
    """struct kvm_tdx_init_mem_region as the kernel writes it back."""

    source_addr: int
    gpa: int
    nr_pages: int = Field(description="Pages left: 0 once every page was added.")


class TdvmcallMapGpa(Body):
    gpa: U64 = Field(description="Start GPA; its shared bit says to what: set → shared.")
    size: U64 = Field(description="Bytes (4 KiB multiple, else TDVMCALL_STATUS_ALIGN_ERROR).")


class Hypercall(Body):
    """A guest's VMCALL with KVM's hypercall ABI (arch/x86/kvm/x86.c ____kvm_emulate_hypercall)."""

    nr: U64 = Field(description="RAX: the hypercall number; KVM_HC_MAP_GPA_RANGE is 12.")
    a0: U64 = Field(default=0, description="RBX: for MAP_GPA_RANGE the start GPA.")
    a1: U64 = Field(default=0, description="RCX: for MAP_GPA_RANGE the number of 4 KiB pages.")
    a2: U64 = Field(
        default=0,
        description="RDX: for MAP_GPA_RANGE the attributes: KVM_MAP_GPA_RANGE_ENCRYPTED (16) "
        "converts to private, 0 to shared.",
    )
    a3: U64 = Field(default=0, description="RSI: unused by MAP_GPA_RANGE.")
    long_mode: bool = Field(
        default=True, description="64-bit mode; false cuts every register to 32 bits."
    )
    cpl: int = Field(default=0, ge=0, le=3, description="The guest's CPL; not 0 → -KVM_EPERM.")


class HypercallComplete(Body):
    ret: U64 = Field(default=0, description="run->hypercall.ret the VMM leaves: 0 = converted.")


class HypercallExit(Answer):
    """`struct kvm_run` `hypercall` of KVM_EXIT_HYPERCALL (exit reason 3)."""

    reason: Literal["KVM_EXIT_HYPERCALL"]
    nr: int = Field(description="KVM_HC_MAP_GPA_RANGE (12).")
    args: list[int] = Field(
        description="[gpa, pages, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED (16) to private, "
        "0 to shared]. For a TD's MapGPA the GPA is without the shared bit and pages ≤ 512."
    )
    flags: int = Field(
        description="KVM_EXIT_HYPERCALL_LONG_MODE (1) unless the guest was not in 64-bit mode."
    )
    ret: int = Field(description="0 as KVM leaves it (QEMU ≤ 9.2 relies on that).")


class MapGpaResult(Answer):
    """Either the vCPU waits in a KVM_EXIT_HYPERCALL (`exit`), or the call went back to the
    guest: a TD's TDVMCALL with `status` in R10 (and `r11`, the GPA it stopped at, on
    failure), a VMCALL with `rax`."""

    status: (
        Literal[
            "TDVMCALL_STATUS_SUCCESS",
            "TDVMCALL_STATUS_RETRY",
            "TDVMCALL_STATUS_INVALID_OPERAND",
            "TDVMCALL_STATUS_ALIGN_ERROR",
            "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED",
        ]
        | None
    )
    status_code: int | None = Field(description="The status as the guest sees it in R10.")
    r11: int | None = Field(description="R11 on a failed request: the GPA it stopped at.")
    exit: HypercallExit | None
    rax: int | None = Field(
        default=None,
        description="What a VMCALL returns in RAX: 0 or run->hypercall.ret after the exit, "
        "else -KVM_EPERM (-1), -KVM_EINVAL (-22) or -KVM_ENOSYS (-1000) as an unsigned "
        "register (32 bits outside 64-bit mode). Null for a TD's MapGPA.",
    )


class MapGpaPending(Answer):
    vcpu: int
    next_gpa: int = Field(description="GPA of the chunk the exit is about.")
    end_gpa: int = Field(description="End of the guest's request.")
