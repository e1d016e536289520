"""VMs, vCPUs, capabilities and quirks."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictBool

from app.api.schemas.common import (
    ID_PATTERN,
    TEXT_PATTERN,
    U32,
    Body,
    Open,
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


class VmCreate(Body):
    name: Annotated[str | None, Field(max_length=200, pattern=TEXT_PATTERN)] = None
    vm_type: VmTypeField = 0
    vcpus: Annotated[U32, Field(description="vCPU ids 0…n−1 are created with the VM.")] = 1
    paging_levels: Annotated[U32, Field(description="TDP levels: 4 or 5.")] = 4
    from_snapshot: Annotated[
        str | None,
        Field(
            pattern=ID_PATTERN, description="Fork: the new VM starts from this snapshot's state."
        ),
    ] = None


class VmInfo(Open):
    id: str


class DeletedVm(Open):
    pass


class VcpuCreate(Body):
    id: U32


class VcpuInfo(Open):
    id: int


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


class QuirkInfo(Open):
    name: str
    bit: int
    enabled: bool
    applicable: bool


class Quirks(Open):
    enabled_mask: int
    disabled_mask: int
    quirks: list[QuirkInfo]
