"""A vCPU: its address space (SMM or not), the roots it runs on, its stats; and the two
operations that change vCPUs."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from . import tdx_lifecycle
from .errors import KvmError, einval
from .op import Op, operation
from .roots import RootRole
from .stats import VCPU_STAT_NAMES

if TYPE_CHECKING:
    from .state import KvmState


class Vcpu:
    __slots__ = ("id", "as_id", "roots", "running", "stats", "hypercall_exit")

    def __init__(self, id: int) -> None:
        self.id = id
        self.as_id = 0  # 1 while the vCPU is in SMM (set_vcpu_smm)
        self.roots: dict[RootRole, int] = {}
        self.running = False  # inside KVM_RUN once it has touched memory: flushes IPI it
        self.stats = dict.fromkeys(VCPU_STAT_NAMES, 0)
        # run->hypercall.flags of a KVM_EXIT_HYPERCALL the vCPU waits in (hypercall.py)
        self.hypercall_exit: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "as_id": self.as_id,
            "smm": self.as_id == 1,
            "running": self.running,
            "roots": {r.value: rid for r, rid in self.roots.items()},
            "stats": self.stats,
        }


@operation("create_vcpu")
class CreateVcpu(Op):
    """KVM_CREATE_VCPU."""

    id: int


@operation("set_vcpu_smm")
class SetVcpuSmm(Op):
    """KVM_SET_VCPU_EVENTS(smm.smm): enter or leave SMM (address space 1)."""

    vcpu: int
    smm: bool


def create_vcpu(vm: KvmState, op: CreateVcpu) -> dict[str, Any]:
    """KVM_CREATE_VCPU: id < KVM_MAX_VCPU_IDS (4096, x86), at most KVM_MAX_VCPUS (1024)
    vCPUs, an id only once (EEXIST) — kvm_vm_ioctl_create_vcpu."""
    id = op.id
    if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < 4096:
        raise einval("vCPU id must be in [0, 4096)")
    tdx_lifecycle.check_can_create_vcpu(vm)
    if id in vm.vcpus:
        raise KvmError(errno.EEXIST, f"vCPU {id} already exists")
    if len(vm.vcpus) >= 1024:
        raise einval("KVM_MAX_VCPUS reached")
    vm.vcpus[id] = Vcpu(id)
    return {"id": id}


def set_vcpu_smm(vm: KvmState, op: SetVcpuSmm) -> dict[str, Any]:
    """KVM_SET_VCPU_EVENTS(smm.smm): the vCPU enters or leaves SMM, so its accesses use
    memslot address space 1 and the SMM roots (VMs without private memory only)."""
    vcpu, smm = op.vcpu, op.smm
    v = vm.vcpu(vcpu)
    if not isinstance(smm, bool):
        raise einval("smm must be true or false")
    if smm and vm.nr_as < 2:
        raise einval("this VM type has no SMM address space")
    v.as_id = 1 if smm else 0
    return v.to_dict()
