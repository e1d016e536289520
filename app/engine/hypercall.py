"""A guest's request to convert memory, and the KVM_EXIT_HYPERCALL it becomes.

Two guest calls end in that exit. A TD asks with TDG.VP.VMCALL<MapGPA> (below). Any other
guest (a KVM_X86_SW_PROTECTED_VM, say), or a TD through a plain KVM hypercall, executes
VMCALL with KVM_HC_MAP_GPA_RANGE in RAX: arch/x86/kvm/x86.c ____kvm_emulate_hypercall
checks CPL 0 (else -KVM_EPERM), KVM_CAP_EXIT_HYPERCALL (else -KVM_ENOSYS), then a page-aligned,
non-empty, non-wrapping range (else -KVM_EINVAL), and exits with the guest's arguments as
they are; complete_hypercall_exit writes run->hypercall.ret to RAX (truncated to 32 bits
outside 64-bit mode) when the VMM re-enters.

The guest asks to convert [gpa, gpa + size) to private (shared bit clear) or shared (set).
KVM does not change attributes itself: it exits to userspace with KVM_EXIT_HYPERCALL,
nr KVM_HC_MAP_GPA_RANGE, one chunk of at most 2 MiB at a time; the VMM calls
KVM_SET_MEMORY_ATTRIBUTES and completes the exit (`run->hypercall.ret`), and the next
KVM_RUN either exits for the next chunk or returns to the guest. arch/x86/kvm/vmx/tdx.c
(torvalds/linux @3829d81b): tdx_map_gpa, __tdx_map_gpa, tdx_complete_vmcall_map_gpa.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from . import addr as A
from .errors import KvmError, check_u64, einval
from .op import Op, operation
from .tdx_lifecycle import check_can_run
from .uapi import (
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SIZE,
    ExitReason,
)

if TYPE_CHECKING:
    from .state import KvmState
    from .tdx import TdxState
    from .vcpu import Vcpu

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

# include/uapi/linux/kvm_para.h: what a refused hypercall leaves in RAX (negated).
KVM_EPERM = errno.EPERM
KVM_EINVAL = errno.EINVAL
KVM_ENOSYS = 1000
# The other hypercalls ____kvm_emulate_hypercall knows (kvm_para.h); vkmmu does not model
# what they do (PV IPIs, clock pairing, directed yield), so it refuses them instead of
# answering as if they had run.
_UNMODELLED = {
    1: "KVM_HC_VAPIC_POLL_IRQ",
    5: "KVM_HC_KICK_CPU",
    9: "KVM_HC_CLOCK_PAIRING",
    10: "KVM_HC_SEND_IPI",
    11: "KVM_HC_SCHED_YIELD",
}
_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1


@operation("tdvmcall_map_gpa")
class TdvmcallMapGpa(Op):
    """A TD vCPU's TDG.VP.VMCALL<MapGPA>(gpa, size): the shared bit of `gpa` says to what."""

    vcpu: int
    gpa: int
    size: int


@operation("hypercall")
class Hypercall(Op):
    """A guest's VMCALL with KVM's hypercall ABI: `nr` in RAX, `a0`..`a3` in RBX, RCX, RDX,
    RSI, executed at `cpl` in 64-bit mode or not (`long_mode`)."""

    vcpu: int
    nr: int
    a0: int = 0
    a1: int = 0
    a2: int = 0
    a3: int = 0
    long_mode: bool = True
    cpl: int = 0


@operation("complete_hypercall")
class CompleteHypercall(Op):
    """KVM_RUN after a KVM_EXIT_HYPERCALL, with `ret` in run->hypercall.ret (0: done)."""

    vcpu: int
    ret: int = 0


def _answer(status: str, r11: int | None = None) -> dict[str, Any]:
    return {"status": status, "status_code": _STATUS[status], "r11": r11, "exit": None, "rax": None}


def _exit(vm: KvmState, td: TdxState, vcpu: int, nxt: int, end: int) -> dict[str, Any]:
    """__tdx_map_gpa: the next chunk as a KVM_EXIT_HYPERCALL; the vCPU waits in it."""
    size = min(end - nxt, TDX_MAP_GPA_MAX_LEN)
    private = not A.is_shared(A.gpa_to_gfn(nxt), vm.gfn_direct_bits)
    td.map_gpa[vcpu] = (nxt, end)
    shared_bit = A.gfn_to_gpa(vm.gfn_direct_bits)
    return {
        "status": None,
        "status_code": None,
        "r11": None,
        "rax": None,
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


def _rax(value: int | None) -> dict[str, Any]:
    """The hypercall returned to the guest with `value` in RAX."""
    return {"status": None, "status_code": None, "r11": None, "exit": None, "rax": value}


def _not_in_exit(vm: KvmState, vcpu: int, *, map_gpa: bool = True) -> None:
    """A vCPU waiting in KVM_EXIT_HYPERCALL runs no guest instruction until KVM_RUN completes
    the exit, so it cannot make another call. (A MapGPA issued while another MapGPA waits
    replaces it, as it always has in vkmmu, so that journals holding one still replay:
    `map_gpa=False` leaves that case out.)"""
    waiting = vm.vcpu(vcpu).hypercall_exit is not None or (
        map_gpa and vm.tdx is not None and vcpu in vm.tdx.map_gpa
    )
    if waiting:
        raise einval(
            f"vCPU {vcpu} waits in KVM_EXIT_HYPERCALL: complete it first (…/hypercall/complete)"
        )


def hypercall(vm: KvmState, op: Hypercall) -> dict[str, Any]:
    """____kvm_emulate_hypercall, for KVM_HC_MAP_GPA_RANGE: the registers are cut to 32 bits
    outside 64-bit mode, then a refusal goes back to the guest in RAX (not an ioctl error);
    otherwise the vCPU exits to userspace with the arguments as the guest gave them."""
    v = _caller(vm, op)
    mask = _U64 if op.long_mode else _U32
    nr, gpa, npages, attrs, _a3 = (
        check_u64(x, name) & mask
        for x, name in ((op.nr, "nr"), (op.a0, "a0"), (op.a1, "a1"), (op.a2, "a2"), (op.a3, "a3"))
    )
    refused = _refusal(vm, op.cpl, nr, gpa, npages)
    if refused:
        return _rax(-refused & mask)
    flags = KVM_EXIT_HYPERCALL_LONG_MODE if op.long_mode else 0
    v.hypercall_exit = flags
    exit_ = {"reason": ExitReason.KVM_EXIT_HYPERCALL.name, "nr": nr, "args": [gpa, npages, attrs]}
    return {**_rax(None), "exit": {**exit_, "flags": flags, "ret": 0}}


def _caller(vm: KvmState, op: Hypercall) -> Vcpu:
    """The vCPU making the call. A TD makes it through TDG.VP.VMCALL (tdx_emulate_vmcall),
    from a runnable TD, at CPL 0 in 64-bit mode."""
    if not isinstance(op.long_mode, bool):
        raise einval("long_mode must be a boolean")
    if check_u64(op.cpl, "cpl") > 3:
        raise einval("cpl is 0..3")
    if vm.tdx is not None:
        run_td_vcpu(vm, op.vcpu, "TDG.VP.VMCALL")
        if op.cpl or not op.long_mode:
            raise einval("a TD's TDG.VP.VMCALL runs at CPL 0 in 64-bit mode (vkmmu)")
    v = vm.vcpu(op.vcpu)
    _not_in_exit(vm, op.vcpu)
    return v


def _refusal(vm: KvmState, cpl: int, nr: int, gpa: int, npages: int) -> int:
    """The KVM_E* the guest gets, in the kernel's order (0: the call exits): CPL > 0, then
    the hypercall (unknown, or its exit not enabled), then the range (unaligned, empty,
    gfn + npages wrapping)."""
    if cpl:
        return KVM_EPERM
    if nr in _UNMODELLED:
        raise KvmError(errno.EOPNOTSUPP, f"{_UNMODELLED[nr]} is not modelled by vkmmu")
    if nr != KVM_HC_MAP_GPA_RANGE or not vm.hypercall_exit_enabled & (1 << nr):
        return KVM_ENOSYS
    if gpa & (PAGE_SIZE - 1) or not npages or A.gpa_to_gfn(gpa) + npages > _U64:
        return KVM_EINVAL
    return 0


def map_gpa(vm: KvmState, op: TdvmcallMapGpa) -> dict[str, Any]:
    """tdx_map_gpa: exits enabled (else SUBFUNC_UNSUPPORTED), then a legal, non-wrapping range
    on one side of the shared bit (else INVALID_OPERAND), then 4 KiB alignment (else
    ALIGN_ERROR). A refused request goes back to the guest with R11 = gpa: not an API error."""
    td = run_td_vcpu(vm, op.vcpu, "TDG.VP.VMCALL<MapGPA>")
    _not_in_exit(vm, op.vcpu, map_gpa=False)
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


def complete(vm: KvmState, op: CompleteHypercall) -> dict[str, Any]:
    """KVM_RUN of a vCPU waiting in KVM_EXIT_HYPERCALL: complete_userspace_io runs first."""
    v = vm.vcpu(op.vcpu)
    if vm.tdx is not None:
        run_td_vcpu(vm, op.vcpu, "KVM_RUN")
        if op.vcpu in vm.tdx.map_gpa:
            return _complete_map_gpa(vm, vm.tdx, op)
    ret = check_u64(op.ret, "ret")
    if v.hypercall_exit is None:
        raise einval(f"vCPU {op.vcpu} is not in a KVM_EXIT_HYPERCALL (vkmmu)")
    long_mode = bool(v.hypercall_exit & KVM_EXIT_HYPERCALL_LONG_MODE)
    v.hypercall_exit = None
    return _rax(ret if long_mode else ret & _U32)


def _complete_map_gpa(vm: KvmState, td: TdxState, op: CompleteHypercall) -> dict[str, Any]:
    """tdx_complete_vmcall_map_gpa: ret ≠ 0 → INVALID_OPERAND with R11 = the chunk's GPA;
    else the next chunk, or SUCCESS when the range is done. (No interrupt is ever pending in
    vkmmu, so TDVMCALL_STATUS_RETRY does not occur.)"""
    ret = check_u64(op.ret, "ret")
    nxt, end = td.map_gpa.pop(op.vcpu)
    if ret:
        return _answer("TDVMCALL_STATUS_INVALID_OPERAND", nxt)
    nxt += TDX_MAP_GPA_MAX_LEN
    if nxt >= end:
        return _answer("TDVMCALL_STATUS_SUCCESS")
    return _exit(vm, td, op.vcpu, nxt, end)


def run_td_vcpu(vm: KvmState, vcpu: object, what: str) -> TdxState:
    """A TD vCPU that KVM_RUN may enter (tdx_vcpu_pre_run), for a guest TDVMCALL."""
    v = vm.vcpu(vcpu)
    if vm.tdx is None:
        raise einval(f"{what} exists only in a TD (KVM_X86_TDX_VM)")
    check_can_run(vm, v)
    return vm.tdx
