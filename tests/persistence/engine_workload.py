"""A workload of real engine calls driven through the service, and a fingerprint of a VM's
whole observable state, to compare a live VM with one rebuilt from the database."""

from __future__ import annotations

import copy
import errno
from typing import Any

import pytest

from app.engine.errors import KvmError
from app.services.vms import VmService

HVA = 0x7F00_0000_0000
GIB = 1 << 30
MIB = 1 << 20
KVM_CAP_DISABLE_QUIRKS2 = 213


def region(slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> dict[str, Any]:
    return {
        "slot": slot,
        "flags": flags,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": hva,
    }


async def drive(svc: VmService, vm_id: str) -> None:
    """Memslots, host memory, faults, zaps, a rejected call and a state-changing error."""
    m = svc.mutate
    await m(
        vm_id, "enable_cap", {"cap": KVM_CAP_DISABLE_QUIRKS2, "flags": 0, "args": [1 << 5, 0, 0, 0]}
    )
    await m(vm_id, "create_vcpu", {"id": 3})
    await m(vm_id, "set_user_memory_region", region(0, 0, GIB, HVA))
    await m(vm_id, "set_user_memory_region", region(1, 4 * GIB, 16 * MIB, HVA + 2 * GIB, flags=1))
    await m(vm_id, "host_write", {"userspace_addr": HVA + 0x1000, "data": "00112233deadbeef"})
    await m(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 4 * MIB, "access": "write"})
    await m(vm_id, "store", {"vcpu": 3, "gpa": 0x2000, "data": "cafebabe"})
    await m(vm_id, "access", {"vcpu": 0, "gpa": 4 * GIB, "size": 2 * MIB, "access": "write"})
    await m(vm_id, "get_dirty_log", {"slot": 1})
    await m(vm_id, "host_discard", {"userspace_addr": HVA + MIB, "len": MIB})
    await m(vm_id, "access", {"vcpu": 1, "gpa": 0, "size": 4 * MIB, "access": "read"})
    with pytest.raises(KvmError) as rejected:
        await m(vm_id, "create_vcpu", {"id": 3})
    assert rejected.value.errno == errno.EEXIST
    # A MOVE whose late check fails after the zap: journaled with its error.
    with pytest.raises(KvmError) as moved:
        await m(vm_id, "set_user_memory_region", region(0, (1 << 52) - 4 * 4096, GIB, HVA))
    assert moved.value.errno == errno.EINVAL and getattr(moved.value, "state_changed", False)
    await m(vm_id, "access", {"vcpu": 0, "gpa": 0, "size": 8 * MIB, "access": "exec"})
    await m(vm_id, "zap", {"scope": "range", "gpa": 0, "size": 2 * MIB, "roots": "shared"})
    await m(vm_id, "set_user_memory_region", region(1, 4 * GIB, 0, HVA + 2 * GIB, flags=1))


def fingerprint(vm: Any) -> dict[str, Any]:
    """Everything a client can observe of a VM, zap durations included (the journal keeps the
    measured ones, so replay gives them back bit for bit)."""
    events = vm.zap_events()
    # Deep copy: some views hand out live engine dicts that later calls keep changing.
    return copy.deepcopy(
        {
            "info": vm.info(),
            "quirks": vm.quirks(),
            "memslots": vm.memslots(),
            "vcpus": vm.vcpus_view(),
            "gmem": vm.guest_memfds(),
            "attributes": vm.memory_attributes(),
            "roots": vm.roots(),
            "stats": vm.stats(),
            "mappings": vm.mappings(),
            "events": events,
            "audit": vm.audit(),
            "memory": vm.host_read(HVA, 0x4000),
            "translate": vm.translate(0x2000),
        }
    )
