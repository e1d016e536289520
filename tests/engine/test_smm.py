"""SMM: a vCPU in SMM uses memslot address space 1 and its own roots (kvm-memslots.md §1.1)."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse

HVA = 0x7F00_0000_0000
MB = 1 << 20


def slot(vm: Vm, as_id: int, gpa: int, hva: int) -> None:
    vm.apply(
        parse(
            "set_user_memory_region",
            dict(
                slot=(as_id << 16) | 0,
                flags=0,
                guest_phys_addr=gpa,
                memory_size=MB,
                userspace_addr=hva,
            ),
        ),
    )


def test_smm_vcpu_uses_address_space_1_and_its_own_root() -> None:
    vm = Vm.create(0, 1)
    slot(vm, 0, 0, HVA)
    slot(vm, 1, 0, HVA + 16 * MB)  # SMRAM: the same GPA backed by other host memory
    vm.apply(parse("host_write", dict(userspace_addr=HVA, data="aa")))
    vm.apply(parse("host_write", dict(userspace_addr=HVA + 16 * MB, data="bb")))
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0, len=1))) == {"data": "aa"}
    assert vm.apply(parse("set_vcpu_smm", dict(vcpu=0, smm=True)))["as_id"] == 1
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0, len=1))) == {"data": "bb"}
    roots = {r["as_id"]: r for r in vm.roots()}
    assert set(roots) == {0, 1} and roots[1]["sptes"]["4k"] == 1
    assert vm.vcpus_view()[0]["roots"]["direct"] == roots[1]["id"]
    assert vm.vcpus_view()[0]["stats"]["root_reloads"] == 0  # a switch, not a reload
    # Deleting the SMM slot zaps only address space 1 with the quirk off.
    vm.apply(parse("enable_cap", dict(cap="KVM_CAP_DISABLE_QUIRKS2", args=[0x80, 0, 0, 0])))
    z = vm.apply(
        parse(
            "set_user_memory_region",
            dict(slot=1 << 16, flags=0, guest_phys_addr=0, memory_size=0, userspace_addr=HVA),
        ),
    )["zap"]
    assert z["path"] == "zap_slot_leafs" and z["sptes_zapped"]["4k"] == 1
    assert {r["as_id"]: r["sptes"]["4k"] for r in vm.roots()} == {0: 1, 1: 0}
    r = vm.apply(parse("load", dict(vcpu=0, gpa=0, len=1)))
    assert r["exit"]["reason"] == "KVM_EXIT_MMIO"
    vm.apply(parse("set_vcpu_smm", dict(vcpu=0, smm=False)))
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0, len=1))) == {"data": "aa"}
    assert vm.audit()["ok"]


@pytest.mark.parametrize("vm_type", [1, 5])
def test_private_memory_vms_have_no_smm(vm_type: int) -> None:
    vm = Vm.create(vm_type, 1)
    with pytest.raises(KvmError) as e:
        vm.apply(parse("set_vcpu_smm", dict(vcpu=0, smm=True)))
    assert e.value.errno == errno.EINVAL


def test_smm_flag_must_be_a_bool() -> None:
    vm = Vm.create(0, 1)
    for bad in (1, "yes", None):
        with pytest.raises(KvmError) as e:
            vm.apply(parse("set_vcpu_smm", dict(vcpu=0, smm=bad)))
        assert e.value.errno == errno.EINVAL
