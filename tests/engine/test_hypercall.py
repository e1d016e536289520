"""A guest's VMCALL with KVM_HC_MAP_GPA_RANGE, as arch/x86/kvm/x86.c ____kvm_emulate_hypercall
handles it: registers cut to 32 bits outside 64-bit mode, then CPL > 0 → -KVM_EPERM, the exit
not enabled (KVM_CAP_EXIT_HYPERCALL) → -KVM_ENOSYS, an unaligned, empty or wrapping range →
-KVM_EINVAL, each in RAX; else KVM_EXIT_HYPERCALL with the guest's arguments as they are, and
complete_hypercall_exit puts run->hypercall.ret in RAX (u32 outside 64-bit mode)."""

from __future__ import annotations

import errno

import pytest

from app.engine import Vm, codec
from app.engine.ops import parse
from tests.engine.mmu import TDX, rejected

SW_PROTECTED = 1
U64 = (1 << 64) - 1
# include/uapi/linux/kvm_para.h
KVM_EPERM, KVM_EINVAL, KVM_ENOSYS = 1, 22, 1000
KVM_HC_MAP_GPA_RANGE = 12
ENCRYPTED = 1 << 4  # KVM_MAP_GPA_RANGE_ENCRYPTED


def enable(vm: Vm) -> None:
    cap = {"cap": 201, "flags": 0, "args": [1 << KVM_HC_MAP_GPA_RANGE]}  # KVM_CAP_EXIT_HYPERCALL
    vm.apply(parse("enable_cap", cap))


def call(vm: Vm, **regs: object) -> dict:
    return vm.apply(parse("hypercall", {"vcpu": 0, "nr": KVM_HC_MAP_GPA_RANGE, **regs}))


def complete(vm: Vm, ret: int = 0) -> dict:
    return vm.apply(parse("complete_hypercall", {"vcpu": 0, "ret": ret}))


def test_the_exit_carries_the_guests_arguments_and_completion_sets_rax() -> None:
    vm = Vm.create(SW_PROTECTED, 1)
    enable(vm)
    out = call(vm, a0=0x20_0000, a1=16, a2=ENCRYPTED)
    assert out["rax"] is None and out["status"] is None
    assert out["exit"] == {
        "reason": "KVM_EXIT_HYPERCALL",
        "nr": KVM_HC_MAP_GPA_RANGE,
        "args": [0x20_0000, 16, ENCRYPTED],
        "flags": 1,  # KVM_EXIT_HYPERCALL_LONG_MODE
        "ret": 0,
    }
    # The vCPU waits in the exit: it makes no other call until KVM_RUN completes it.
    assert rejected(vm, "hypercall", {"vcpu": 0, "nr": 12}).errno == errno.EINVAL
    assert complete(vm, ret=0)["rax"] == 0
    assert rejected(vm, "complete_hypercall", {"vcpu": 0}).errno == errno.EINVAL


def test_refusals_go_back_to_the_guest_in_rax_in_the_kernels_order() -> None:
    vm = Vm.create(SW_PROTECTED, 1)
    # Exit not enabled: -KVM_ENOSYS, even for a bad range (the cap is checked first).
    assert call(vm, a0=1, a1=0)["rax"] == -KVM_ENOSYS & U64
    # CPL > 0 is checked before the hypercall number.
    assert call(vm, cpl=3)["rax"] == -KVM_EPERM & U64
    enable(vm)
    assert call(vm, a0=0x1001, a1=1)["rax"] == -KVM_EINVAL & U64  # unaligned
    assert call(vm, a0=0x1000, a1=0)["rax"] == -KVM_EINVAL & U64  # no pages
    assert call(vm, a0=1 << 51, a1=U64)["rax"] == -KVM_EINVAL & U64  # gfn + npages wraps
    assert call(vm, nr=99)["rax"] == -KVM_ENOSYS & U64  # unknown hypercall
    assert rejected(vm, "hypercall", {"vcpu": 0, "nr": 5}).errno == errno.EOPNOTSUPP
    assert rejected(vm, "hypercall", {"vcpu": 0, "nr": 12, "cpl": 4}).errno == errno.EINVAL
    assert all(v.hypercall_exit is None for v in vm.vcpus.values())


def test_outside_64_bit_mode_registers_and_rax_are_32_bits() -> None:
    vm = Vm.create(0, 1)
    assert call(vm, long_mode=False)["rax"] == -KVM_ENOSYS & 0xFFFF_FFFF
    enable(vm)
    # nr and the arguments lose their upper halves before anything is checked.
    out = call(
        vm, nr=(1 << 32) | KVM_HC_MAP_GPA_RANGE, a0=(7 << 32) | 0x3000, a1=2, long_mode=False
    )
    assert out["exit"]["args"] == [0x3000, 2, 0] and out["exit"]["flags"] == 0
    assert complete(vm, ret=U64)["rax"] == 0xFFFF_FFFF


def test_a_waiting_exit_survives_a_snapshot_and_enters_the_digest() -> None:
    vm = Vm.create(SW_PROTECTED, 2)
    enable(vm)
    before = codec.digest(vm)
    call(vm, a0=0, a1=1)
    assert codec.digest(vm) != before
    back = codec.loads(codec.dumps(vm))
    assert codec.digest(back) == codec.digest(vm)
    assert back.vcpus[0].hypercall_exit == 1 and back.vcpus[1].hypercall_exit is None
    assert complete(back, ret=5)["rax"] == 5


def test_a_td_makes_the_call_through_tdvmcall_at_cpl0_in_64_bit_mode() -> None:
    td = Vm.create(TDX, 1)
    enable(td)
    assert rejected(td, "hypercall", {"vcpu": 0, "nr": 12, "cpl": 3}).errno == errno.EINVAL
    out = call(td, a0=1 << 47, a1=1)  # tdx_emulate_vmcall: no chunking, arguments as given
    assert out["exit"]["args"] == [1 << 47, 1, 0]
    # A MapGPA cannot start while the vCPU waits in the exit.
    map_gpa = {"vcpu": 0, "gpa": 0, "size": 4096}
    assert rejected(td, "tdvmcall_map_gpa", map_gpa).errno == errno.EINVAL
    assert complete(td)["rax"] == 0
    assert td.apply(parse("tdvmcall_map_gpa", map_gpa))["exit"]["args"] == [0, 1, ENCRYPTED]


@pytest.mark.parametrize("vcpu", [1, -1])
def test_an_unknown_vcpu_is_refused(vcpu: int) -> None:
    vm = Vm.create(0, 1)
    assert rejected(vm, "hypercall", {"vcpu": vcpu, "nr": 12}).errno == errno.ENOENT
