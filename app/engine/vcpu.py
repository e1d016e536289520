"""A vCPU: its address space (SMM or not), the roots it runs on, its stats; and the two
operations that change vCPUs."""

from __future__ import annotations

from .op import Op, operation
from .roots import RootRole
from .stats import VCPU_STAT_NAMES


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
