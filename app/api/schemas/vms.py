"""VMs, vCPUs, capabilities and quirks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, create_model

from app.api.schemas.common import (
    ID_PATTERN,
    TEXT_PATTERN,
    U32,
    Answer,
    Body,
    constant_schema,
    constant_validator,
    enum_members,
    flags_schema,
    flags_validator,
)
from app.engine import uapi

_VM_TYPES = enum_members(uapi.VmType)
_CAPS = enum_members(uapi.Cap)
# Values that `KVM_ENABLE_CAP` takes in args[0]: quirk masks and dirty-log-protect bits.
_CAP_ARG_NAMES = enum_members(uapi.Quirk) | {
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "KVM_DIRTY_LOG_INITIALLY_SET": uapi.KVM_DIRTY_LOG_INITIALLY_SET,
}

VmTypeField = Annotated[
    int,
    constant_validator(_VM_TYPES, 64),
    constant_schema(_VM_TYPES, 64, "VM type (KVM_CREATE_VM's argument)"),
]
CapField = Annotated[int, constant_validator(_CAPS, 32), constant_schema(_CAPS, 32, "capability")]
CapArg = Annotated[
    int,
    flags_validator(_CAP_ARG_NAMES, 64),
    flags_schema(_CAP_ARG_NAMES, 64, "u64 argument (quirk masks may be lists of KVM_X86_QUIRK_*)"),
]


class HostProfileIn(Body):
    """The host's KVM module parameters for this VM; a missing one is the service's
    (VKMMU_HOST_*). docs/engine.md "Host profile"."""

    enable_pml: bool | None = Field(
        default=None, description="kvm_intel.pml: dirty logging clears D bits, no faults."
    )
    eager_page_split: bool | None = Field(
        default=None, description="kvm.eager_page_split: split huge pages when logging starts."
    )
    nx_huge_pages: bool | None = Field(
        default=None, description="kvm.nx_huge_pages: exec faults map 4K (iTLB multihit)."
    )
    tdp_mmu: bool | None = Field(
        default=None, description="kvm.tdp_mmu: false is EOPNOTSUPP (no shadow MMU here)."
    )

    def given(self) -> dict[str, bool]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class HostProfile(Answer):
    """The host's KVM module parameters a VM runs under."""

    enable_pml: bool
    eager_page_split: bool
    nx_huge_pages: bool
    tdp_mmu: bool


class VmCreate(Body):
    name: Annotated[str | None, Field(max_length=200, pattern=TEXT_PATTERN)] = None
    vm_type: VmTypeField = 0
    vcpus: Annotated[U32, Field(description="vCPU ids 0…n−1 are created with the VM.")] = 1
    paging_levels: Annotated[U32, Field(description="TDP levels: 4 or 5.")] = 4
    host: HostProfileIn | None = Field(
        default=None,
        description="Host module parameters for this VM (PML, eager page split, NX huge pages, "
        "TDP MMU); missing ones are the service's (GET /v1/capabilities `host`).",
    )
    td_lifecycle: bool = Field(
        default=False,
        description="A TD (vm_type 5) that goes through KVM_TDX_INIT_VM, KVM_TDX_INIT_VCPU, "
        "KVM_TDX_INIT_MEM_REGION and KVM_TDX_FINALIZE_VM before it runs (…/tdx/…); its vCPUs "
        "are created after INIT_VM, so `vcpus` must be 0. False: runnable at creation.",
    )
    from_snapshot: Annotated[
        str | None,
        Field(
            pattern=ID_PATTERN, description="Fork: the new VM starts from this snapshot's state."
        ),
    ] = None


class VmInfo(Answer):
    id: str
    name: str | None
    vm_type: int
    vm_type_name: str
    vcpus: int = Field(description="vCPUs created with the VM (later ones: `…/vcpus`).")
    paging_levels: int
    nr_address_spaces: int
    has_private_mem: bool
    gfn_direct_bits: int = Field(description="A TD's shared bit as a GFN mask; 0 otherwise.")
    zap_policy: Literal["kvm", "zap_all_shared_only"]
    slot_zap_all_applies: bool = Field(
        description="Whether KVM_X86_QUIRK_SLOT_ZAP_ALL can apply to this VM type."
    )
    memslots: int = Field(description="Memslots now.")
    destroyed: bool
    tenant: str
    host: HostProfile | None = Field(
        default=None, description="The host profile the VM runs under (null: not reported yet)."
    )
    engine_rev: int | None = Field(
        default=None,
        description="The engine behaviour revision the VM was created under and replays with "
        '(docs/engine.md "Behaviour revisions"); null: not reported yet.',
    )
    created_at: datetime = Field(description="RFC 3339, UTC.")
    version: int = Field(description="The VM's state version (its ETag).")


class VcpuCreate(Body):
    id: U32


class VcpuCreated(Answer):
    id: int


class VcpuRoots(Answer):
    direct: int | None = Field(description="Id of the vCPU's direct root, if loaded.")
    mirror: int | None = Field(description="Id of the vCPU's mirror root (a TD), if loaded.")


class VcpuStats(Answer):
    pf_taken: int
    pf_fixed: int
    pf_fast: int
    pf_spurious: int
    pf_mmio_spte_created: int
    pf_emulate: int
    root_reloads: int


class VcpuInfo(Answer):
    @classmethod
    def of(cls, view: dict[str, Any]) -> VcpuInfo:
        """From the engine's view, whose `roots` lists only the roles loaded."""
        return cls.model_validate(
            view | {"roots": {"direct": None, "mirror": None} | view["roots"]}
        )

    id: int
    as_id: int = Field(description="The address space its accesses use (1 in SMM).")
    smm: bool
    running: bool = Field(description="Whether it has entered the guest (stays in KVM_RUN).")
    roots: VcpuRoots = Field(description="The roots the vCPU has loaded, by role.")
    stats: VcpuStats


class VcpuSmm(Body):
    """`KVM_SET_VCPU_EVENTS` with `smm.smm`: in SMM the vCPU's accesses use memslot address
    space 1 and its own TDP roots."""

    smm: StrictBool


class EnableCap(Body):
    """`struct kvm_enable_cap`."""

    cap: CapField
    flags: U32 = 0
    # Required: args[0] = 0 re-enables every quirk or turns manual dirty-log protect off, so
    # leaving it out must not mean that.
    args: Annotated[
        list[CapArg],
        Field(max_length=4, description="Up to 4 u64 arguments; missing ones are 0."),
    ]

    def engine_args(self) -> dict[str, Any]:
        return {
            "cap": self.cap,
            "flags": self.flags,
            "args": [*self.args, *([0] * (4 - len(self.args)))],
        }


class QuirkInfo(Answer):
    name: str
    bit: int
    value: int = Field(description="`1 << bit`")
    enabled: bool
    applicable: bool = Field(description="Whether the quirk has any effect on this VM type.")


class Quirks(Answer):
    enabled_mask: int
    disabled_mask: int
    quirks: list[QuirkInfo]


class EnabledCaps(Answer):
    """The VM's state that KVM_ENABLE_CAP sets, after the call."""

    quirks: Quirks
    manual_dirty_log_protect: int = Field(
        description="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags in force (0: off)."
    )
    manual_dirty_log_protect_names: list[str]
    hypercall_exit_enabled: int = Field(
        description="KVM_CAP_EXIT_HYPERCALL mask in force: bit 12 (KVM_HC_MAP_GPA_RANGE) makes "
        "a guest's MapGPA exit to userspace."
    )


# One integer field per capability vkmmu models, named as the kernel names it.
Capabilities: type[Answer] = create_model(  # type: ignore[call-overload]
    "Capabilities",
    __base__=Answer,
    __doc__="KVM_CHECK_EXTENSION's answer for each capability (0: not supported).",
    **{cap.name: (int, Field(description=f"KVM_CHECK_EXTENSION({cap.name})")) for cap in uapi.Cap},
    host=(
        HostProfile,
        Field(
            description="The host profile: on /v1/capabilities what new VMs get (VKMMU_HOST_*) "
            "unless they say; on a VM's capabilities, the VM's own."
        ),
    ),
)
