"""A TD guest's MapGPA (TDG.VP.VMCALL<MapGPA>) and its KVM_EXIT_HYPERCALL, as
arch/x86/kvm/vmx/tdx.c does it (torvalds/linux @3829d81b): tdx_map_gpa (checks in order:
KVM_CAP_EXIT_HYPERCALL → SUBFUNC_UNSUPPORTED, range → INVALID_OPERAND, alignment →
ALIGN_ERROR), __tdx_map_gpa (≤ 2 MiB chunks, gpa without the shared bit, ENCRYPTED for
private), tdx_complete_vmcall_map_gpa (ret ≠ 0 → INVALID_OPERAND with R11 = the chunk)."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm, codec
from app.engine.ops import parse
from tests.engine import mmu as kit
from tests.engine.mmu import TDX, attrs, rejected, td_with_gmem

S47 = 1 << 47
MB = 1 << 20
EXIT_HYPERCALL = 201


def enable(vm: Vm, mask: int = 1 << 12) -> None:
    vm.apply(parse("enable_cap", {"cap": EXIT_HYPERCALL, "flags": 0, "args": [mask]}))


def map_gpa(vm: Vm, gpa: int, size: int, vcpu: int = 0) -> dict:
    return vm.apply(parse("tdvmcall_map_gpa", {"vcpu": vcpu, "gpa": gpa, "size": size}))


def complete(vm: Vm, ret: int = 0, vcpu: int = 0) -> dict:
    return vm.apply(parse("complete_hypercall", {"vcpu": vcpu, "ret": ret}))


def test_without_the_exit_enabled_the_guest_gets_subfunc_unsupported() -> None:
    td = Vm.create(TDX, 1)
    out = map_gpa(td, S47, MB)
    assert out["status"] == "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED"
    assert (out["status_code"], out["r11"], out["exit"]) == (0x8000_0000_0000_0003, S47, None)


def test_kvm_cap_exit_hypercall_rules() -> None:
    td = Vm.create(TDX, 1)
    cap = {"cap": EXIT_HYPERCALL, "flags": 0, "args": [1 << 3]}
    assert rejected(td, "enable_cap", cap).errno == errno.EINVAL  # outside the valid mask
    assert rejected(td, "enable_cap", cap | {"flags": 1, "args": [1 << 12]}).errno == errno.EINVAL
    assert td.check_extension("KVM_CAP_EXIT_HYPERCALL") == 1 << 12
    enable(td)
    assert td.hypercall_exit_enabled == 1 << 12


@pytest.mark.parametrize(
    ("gpa", "size", "status"),
    [
        (0, 0, "TDVMCALL_STATUS_INVALID_OPERAND"),  # gpa + size <= gpa
        (S47 - 4096, 8192, "TDVMCALL_STATUS_INVALID_OPERAND"),  # crosses the shared bit
        ((1 << 48) - 4096, 8192, "TDVMCALL_STATUS_INVALID_OPERAND"),  # beyond the GPA width
        (1, 4096, "TDVMCALL_STATUS_ALIGN_ERROR"),
        (0, 100, "TDVMCALL_STATUS_ALIGN_ERROR"),
        # The range check comes before the alignment check: unaligned and crossing.
        (S47 - 4096 + 1, 8192, "TDVMCALL_STATUS_INVALID_OPERAND"),
    ],
)
def test_refused_requests_go_back_to_the_guest(gpa: int, size: int, status: str) -> None:
    td = Vm.create(TDX, 1)
    enable(td)
    before = codec.digest(td)
    out = map_gpa(td, gpa, size)
    assert (out["status"], out["r11"], out["exit"]) == (status, gpa, None)
    assert codec.digest(td) == before


def test_a_conversion_exits_in_2m_chunks_until_the_vmm_completes_each() -> None:
    td, _fd = td_with_gmem(8 * MB)
    enable(td)
    out = map_gpa(td, S47 + MB, 5 * MB)  # to shared: 2M, 2M, 1M
    seen = []
    while out["exit"] is not None:
        e = out["exit"]
        assert (e["reason"], e["nr"], e["flags"], e["ret"]) == ("KVM_EXIT_HYPERCALL", 12, 1, 0)
        gpa, npages, attributes = e["args"]
        assert attributes == 0  # KVM_MAP_GPA_RANGE_DECRYPTED: to shared
        seen.append((gpa, npages))
        attrs(td, gpa, npages * 4096, False)  # what the VMM does: KVM_SET_MEMORY_ATTRIBUTES
        out = complete(td)
    assert seen == [(MB, 512), (3 * MB, 512), (5 * MB, 256)]
    assert out["status"] == "TDVMCALL_STATUS_SUCCESS"
    assert td.tdx_state()["map_gpa_pending"] == []
    kit.check(td)


def test_to_private_is_encrypted_and_a_failed_chunk_ends_the_request() -> None:
    td, _fd = td_with_gmem(8 * MB)
    enable(td)
    e = map_gpa(td, 0, 4 * MB)["exit"]
    assert e["args"] == [0, 512, 1 << 4]  # KVM_MAP_GPA_RANGE_ENCRYPTED
    e = complete(td)["exit"]
    assert e["args"][0] == 2 * MB
    back = codec.loads(codec.dumps(td))  # a vCPU waiting in the exit survives a snapshot
    assert back.tdx_state()["map_gpa_pending"] == [
        {"vcpu": 0, "next_gpa": 2 * MB, "end_gpa": 4 * MB}
    ]
    out = complete(td, ret=1)
    assert (out["status"], out["r11"]) == ("TDVMCALL_STATUS_INVALID_OPERAND", 2 * MB)


def test_complete_without_an_exit_and_map_gpa_outside_a_runnable_td() -> None:
    td = Vm.create(TDX, 1)
    assert rejected(td, "complete_hypercall", {"vcpu": 0}).errno == errno.EINVAL
    vm = Vm.create(0, 1)
    assert rejected(vm, "tdvmcall_map_gpa", {"vcpu": 0, "gpa": 0, "size": 4096}).errno == (
        errno.EINVAL
    )
    life = Vm.create(TDX, 0, td_lifecycle=True)
    life.apply(parse("tdx_init_vm", {}))
    life.apply(parse("create_vcpu", {"id": 0}))
    with pytest.raises(KvmError) as e:  # tdx_vcpu_pre_run: KVM_RUN before finalize
        map_gpa(life, 0, 4096)
    assert e.value.errno == errno.EINVAL
