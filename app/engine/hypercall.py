"""A TD guest's MapGPA request (TDG.VP.VMCALL<MapGPA>) and the KVM_EXIT_HYPERCALL it becomes.

The guest asks to convert [gpa, gpa + size) to private (shared bit clear) or shared (set).
KVM does not change attributes itself: it exits to userspace with KVM_EXIT_HYPERCALL,
nr KVM_HC_MAP_GPA_RANGE, one chunk of at most 2 MiB at a time; the VMM calls
KVM_SET_MEMORY_ATTRIBUTES and completes the exit (`run->hypercall.ret`), and the next
KVM_RUN either exits for the next chunk or returns to the guest. arch/x86/kvm/vmx/tdx.c
(torvalds/linux @3829d81b): tdx_map_gpa, __tdx_map_gpa, tdx_complete_vmcall_map_gpa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import addr as A
from .errors import check_u64, einval
from .op import Op, operation
from .uapi import (
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SIZE,
    ExitReason,
)

if TYPE_CHECKING:
    from .tdx import TdxState
    from .vm import Vm

# arch/x86/include/asm/shared/tdx.h: the TDVMCALL status the guest sees in R10.
TDVMCALL_STATUS = {
    0x0: "TDVMCALL_STATUS_SUCCESS",
    0x1: "TDVMCALL_STATUS_RETRY",
    0x8000_0000_0000_0000: "TDVMCALL_STATUS_INVALID_OPERAND",
    0x8000_0000_0000_0002: "TDVMCALL_STATUS_ALIGN_ERROR",
    0x8000_0000_0000_0003: "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED",
}
_STATUS = {name: code for code, name in TDVMCALL_STATUS.items()}
TDX_MAP_GPA_MAX_LEN = 2 << 20  # one KVM_EXIT_HYPERCALL covers at most 2 MiB


@operation("tdvmcall_map_gpa")
class TdvmcallMapGpa(Op):
    """A TD vCPU's TDG.VP.VMCALL<MapGPA>(gpa, size): the shared bit of `gpa` says to what."""

    vcpu: int
    gpa: int
    size: int


@operation("complete_hypercall")
class CompleteHypercall(Op):
    """KVM_RUN after a KVM_EXIT_HYPERCALL, with `ret` in run->hypercall.ret (0: done)."""

    vcpu: int
    ret: int = 0


def _answer(status: str, r11: int | None = None) -> dict[str, Any]:
    return {"status": status, "status_code": _STATUS[status], "r11": r11, "exit": None}


def _exit(vm: Vm, td: TdxState, vcpu: int, nxt: int, end: int) -> dict[str, Any]:
    """__tdx_map_gpa: the next chunk as a KVM_EXIT_HYPERCALL; the vCPU waits in it."""
    size = min(end - nxt, TDX_MAP_GPA_MAX_LEN)
    private = not A.is_shared(A.gpa_to_gfn(nxt), vm.gfn_direct_bits)
    td.map_gpa[vcpu] = (nxt, end)
    shared_bit = A.gfn_to_gpa(vm.gfn_direct_bits)
    return {
        "status": None,
        "status_code": None,
        "r11": None,
        "exit": {
            "reason": ExitReason.KVM_EXIT_HYPERCALL.name,
            "nr": KVM_HC_MAP_GPA_RANGE,
            "args": [
                nxt & ~shared_bit,
                size // PAGE_SIZE,
                KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED,
            ],
            "flags": KVM_EXIT_HYPERCALL_LONG_MODE,
            "ret": 0,
        },
    }


def map_gpa(vm: Vm, op: TdvmcallMapGpa) -> dict[str, Any]:
    """tdx_map_gpa: exits enabled (else SUBFUNC_UNSUPPORTED), then a legal, non-wrapping range
    on one side of the shared bit (else INVALID_OPERAND), then 4 KiB alignment (else
    ALIGN_ERROR). A refused request goes back to the guest with R11 = gpa: not an API error."""
    td = vm.run_td_vcpu(op.vcpu, "TDG.VP.VMCALL<MapGPA>")
    gpa, size = check_u64(op.gpa, "gpa"), check_u64(op.size, "size")
    if not vm.hypercall_exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE):
        return _answer("TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED", gpa)
    end = gpa + size
    bits = vm.gfn_direct_bits
    if (
        end <= gpa
        or end > vm.gpa_limit  # kvm_vcpu_is_legal_gpa of gpa and gpa + size - 1
        or A.is_shared(A.gpa_to_gfn(gpa), bits) != A.is_shared(A.gpa_to_gfn(end - 1), bits)
    ):
        return _answer("TDVMCALL_STATUS_INVALID_OPERAND", gpa)
    if gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        return _answer("TDVMCALL_STATUS_ALIGN_ERROR", gpa)
    return _exit(vm, td, op.vcpu, gpa, end)


def complete(vm: Vm, op: CompleteHypercall) -> dict[str, Any]:
    """tdx_complete_vmcall_map_gpa: ret ≠ 0 → INVALID_OPERAND with R11 = the chunk's GPA;
    else the next chunk, or SUCCESS when the range is done. (No interrupt is ever pending in
    vkmmu, so TDVMCALL_STATUS_RETRY does not occur.)"""
    td = vm.run_td_vcpu(op.vcpu, "KVM_RUN")
    ret = check_u64(op.ret, "ret")
    pending = td.map_gpa.pop(op.vcpu, None)
    if pending is None:
        raise einval(f"vCPU {op.vcpu} is not in a KVM_EXIT_HYPERCALL (vkmmu)")
    nxt, end = pending
    if ret:
        return _answer("TDVMCALL_STATUS_INVALID_OPERAND", nxt)
    nxt += TDX_MAP_GPA_MAX_LEN
    if nxt >= end:
        return _answer("TDVMCALL_STATUS_SUCCESS")
    return _exit(vm, td, op.vcpu, nxt, end)
