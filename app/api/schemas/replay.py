"""Trace replay and what-if: request and response bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from app.api.schemas.common import (
    U64,
    Answer,
    Body,
    constant_schema,
    constant_validator,
    enum_members,
)
from app.api.schemas.vms import HostProfile, HostProfileIn
from app.api.schemas.zaps import SptesZapped, ZapEvent
from app.engine.uapi import VmType

_VM_TYPES = enum_members(VmType)


class _Out(Answer):
    """Response models: every field documented, nothing passed through unnamed."""

    model_config = ConfigDict(serialize_by_alias=True)


class ReplayRow(_Out):
    line: int = Field(description="line number in the trace")
    slot: int = Field(description="the kernel's slot: as_id << 16 | id")
    ok: bool
    change: Literal["create", "delete", "move", "flags_only", "none"] | None
    errno: int | None
    errno_name: str | None
    ret: int = Field(description="what the traced ioctl returned (0 or -errno)")
    matches_trace: bool = Field(description="this VM answered what the traced kernel did")
    zap: ZapEvent | None
    detail: str | None = Field(description="KVM's reason when the call was refused")


class TraceIssue(_Out):
    line: int
    message: str


class TouchRange(Body):
    gpa: U64
    size: U64


class TouchSummary(_Out):
    mode: str | list[TouchRange]
    accesses: int = Field(description="guest accesses made (each a range of pages)")
    pages_mapped: int
    refaults: int = Field(description="pages faulted again after a zap took them away")
    errors: int
    first_error: str | None


class ReplayResult(_Out):
    results: list[ReplayRow]
    ignored: int = Field(description="comments, blank and other lines")
    errors: list[TraceIssue] = Field(description="lines not replayed, with why")
    lines: int
    applied: int
    mismatches: int
    mismatched_lines: list[int] = Field(description="the first 100 mismatching lines")
    touch: TouchSummary


class ReplayProgress(_Out):
    done: int = Field(description="trace calls handed to the VM so far")
    total: int


Touch = Annotated[
    Literal["none", "all_ram", "after_each"] | list[TouchRange],
    Field(description="guest behaviour between trace lines (see docs/replay.md)"),
]


class VariantIn(Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]
    disable_quirks: Annotated[
        U64 | None,
        Field(
            description="the fork's disabled-quirk mask (128: SLOT_ZAP_ALL off); default: the VM's"
        ),
    ] = None
    vm_type: Annotated[
        int | None,
        constant_validator(_VM_TYPES, 32),
        constant_schema(_VM_TYPES, 32, "VM type"),
        Field(description="another VM type (only while the VM has no memslots)"),
    ] = None
    zap_policy: Literal["kvm", "zap_all_shared_only"] | None = None
    host: HostProfileIn | None = Field(
        default=None,
        description="the fork's host profile over the VM's own (given parameters only); "
        "tdp_mmu false is EOPNOTSUPP",
    )


class WhatIfRequest(Body):
    ops: list[dict[str, Any]] | None = Field(
        default=None,
        description='operations `{"op": NAME, …fields}` as the journal stores them, plus '
        '`{"op": "delete_memslot", "slot": N}`; an `access` without `vcpu` is vCPU 0\'s',
    )
    trace: str | None = Field(
        default=None, description="a QEMU kvm_set_user_memory trace, instead of ops"
    )
    touch: Touch = "none"
    variants: list[VariantIn] = Field(min_length=1)
    costs: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        default=None, description="per-event costs in ns, overriding the defaults"
    )


class SeptOps(_Out):
    """TDX module calls the S-EPT changes took (SEAMCALLs; TDG.MEM.PAGE.ACCEPT is the guest's
    TDCALL)."""

    model_config = ConfigDict(extra="allow")


class Failure(_Out):
    index: int = Field(description="op index, or trace line")
    errno: int | None
    errno_name: str | None
    detail: str | None


class FinalMemslot(_Out):
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int


class Estimate(_Out):
    model: bool = Field(description="always true: this is a model, not a measurement")
    total_us: float
    by_event_us: dict[str, float]
    not_estimated: list[str] = Field(description="events counted that have no cost")


class VariantResult(_Out):
    name: str
    vm_type: int
    vm_type_name: str
    disabled_quirks: int
    slot_zap_all: bool = Field(description="KVM_X86_QUIRK_SLOT_ZAP_ALL in force")
    zap_policy: str
    host: HostProfile = Field(description="the host profile the fork ran under")
    ops_applied: int
    ops_failed: int
    trace_mismatches: int | None
    first_failures: list[Failure]
    zaps: int
    zaps_by_path: dict[str, int]
    sptes_zapped: SptesZapped
    sptes_zapped_total: int
    tables_freed: int
    roots_invalidated: int
    tlb_flushes: int
    vcpu_kicks: int
    faults: int = Field(description="EPT violations taken (pf_taken)")
    faults_fixed: int
    refaults: int
    mmio_sptes: int
    remote_tlb_flush: int
    sept_operations: dict[str, int]
    sept_operations_total: int
    tdx_reaccepts: int
    audit_violations: int
    page_tables: int
    model_wall_ms: float = Field(description="time the model took to run the ops")
    final_memslots: list[FinalMemslot]
    estimate: Estimate


class CostOut(_Out):
    name: str
    counts: str
    default_ns: float | None
    ns: float | None
    source: str


class WhatIfResult(_Out):
    vm: str
    version: str = Field(description="the VM's ETag when it was copied")
    ops: int
    source: Literal["ops", "trace"]
    touch: str | list[TouchRange] | None
    variants: list[VariantResult]
    costs: list[CostOut]
    estimate_note: str
