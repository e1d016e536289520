"""Explicit zaps, zap events, the zap-policy experiment."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from app.api.schemas.common import U64, Answer, Body, LevelCounts


class ZapRequest(Body):
    scope: Literal["all", "range"]
    # Validated even when left out, so that `range` can require them by name (422 naming
    # body.gpa / body.size rather than a bare EINVAL); `all` zaps everything and needs neither.
    gpa: Annotated[
        U64 | None, Field(validate_default=True, description="Required when scope is range.")
    ] = None
    size: Annotated[
        U64 | None, Field(validate_default=True, description="Required when scope is range.")
    ] = None
    roots: Literal["shared", "private", "both"]

    @field_validator("gpa", "size")
    @classmethod
    def _required_for_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("scope") == "range":
            raise ValueError(f"{info.field_name} is required when scope is 'range'")
        return value


class SptesZapped(LevelCounts):
    """Leaf SPTEs zapped: per root role and level, and the per-level totals."""

    direct: LevelCounts = Field(description="Direct roots (a TD's shared EPT).")
    mirror: LevelCounts = Field(description="Mirror roots (a TD's private S-EPT).")


class ZapEvent(Answer):
    """One zap, in the one shape every zap path records (docs/engine.md, "Zap events")."""

    seq: int = Field(description="Per-VM sequence number (the cursor of the zap list).")
    at: datetime = Field(description="When (RFC 3339, UTC): the time of the journaled call.")
    cause: str = Field(
        description="Why: `memslot_delete`, `memslot_move`, `mmu_notifier`, `attributes`, "
        "`punch_hole`, `gmem_close`, `explicit`, `dirty_log`, `vm_destroy`, `mmio_gen_wrap`, "
        "`nx_recovery`, …"
    )
    path: str = Field(
        description="The kernel path that ran: `zap_all_fast`, `zap_slot_leafs`, "
        "`zap_gfn_range`, `zap_all`, `enable_dirty_logging`, …"
    )
    vm_type: str = Field(description="The VM type's name: what the path was chosen from.")
    slot_zap_all: bool = Field(
        description="Whether KVM_X86_QUIRK_SLOT_ZAP_ALL was in force (enabled, default VM)."
    )
    as_id: int | None = Field(description="Address space of the triggering memslot, or null.")
    slot: int | None = Field(description="The memslot that triggered the zap, or null.")
    gfn_start: int = Field(description="First GFN covered.")
    gfn_end: int = Field(description="End (exclusive) of the GFNs covered; a fast zap covers all.")
    sptes_zapped: SptesZapped
    sptes_zapped_total: int
    tables_freed: int = Field(description="Page-table pages freed.")
    roots_invalidated: int
    tlb_flushes: int
    vcpu_kicks: int = Field(description="vCPUs kicked out of the guest (requests or IPIs).")
    duration_us: int = Field(description="Wall time of the zap in the engine, microseconds.")
    huge_pages_split: int = Field(description="Dirty logging: huge leaves split (else 0).")
    sptes_write_protected: int = Field(description="Dirty logging: leaves write-protected.")
    huge_pages_recovered: int = Field(description="Dirty logging off: huge leaves rebuilt.")


class ZapPolicyState(Answer):
    policy: Literal["kvm", "zap_all_shared_only"] = Field(description="The policy now in force.")


class ZapPolicy(Body):
    policy: Literal["kvm", "zap_all_shared_only"] = Field(
        description="`kvm`: what KVM does. `zap_all_shared_only`: NOT KVM — the design KVM "
        "rejected, kept to demonstrate its use-after-free."
    )


class NxRecoverRequest(Body):
    ratio: int = Field(
        default=60,
        ge=0,
        le=1 << 31,
        description="kvm.nx_huge_pages_recovery_ratio: this run takes ceil(n / ratio) of the n "
        "possible NX huge pages, oldest first; 0 takes none.",
    )


class NxRecoverResult(Answer):
    recovered: int = Field(description="Possible NX huge pages this run took.")
    remaining: int = Field(description="Left (the nx_lpage_splits stat).")
    zap: ZapEvent | None = Field(description="The zap (cause `nx_recovery`), or null.")
