"""`Vm`: the aggregate of one simulated KVM VM; one method per ioctl it models.

Every mutating call enters through `apply(op, args)` so the service can journal and replay it;
the engine is deterministic given the same calls and the same `at` timestamps.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import (
    accesses,
    attributes,
    dirty,
    gmem,
    hostmem,
    hypercall,
    memslots,
    tdx_lifecycle,
    views,
)
from . import capabilities as caps
from . import vcpu as vcpu_ops
from .attributes import SetMemoryAttributes
from .audit import audit as audit_vm
from .capabilities import EnableCap
from .dirty import ClearDirtyLog, GetDirtyLog
from .errors import KvmError, einval
from .faults import (
    Accept,
    Access,
    Load,
    PreFault,
    Store,
)
from .gmem import CreateGuestMemfd, GmemClose, GmemFallocate, GmemWrite
from .host_profile import host_profile
from .hostmem import HostAdvise, HostDiscard, HostMap, HostWrite
from .hypercall import CompleteHypercall, Hypercall, TdvmcallMapGpa
from .memslots import (
    SetUserMemoryRegion,
)
from .op import Op
from .revision import ENGINE_REV
from .state import DEFAULT_TABLE_BUDGET, KvmState
from .tdx_lifecycle import TdxFinalizeVm, TdxInitMemRegion, TdxInitVcpu, TdxInitVm
from .uapi import VmType
from .vcpu import CreateVcpu, SetVcpuSmm
from .zap import (
    Destroy,
    ExplicitZap,
    RecoverNxHugePages,
    SetZapPolicy,
    destroy,
    explicit_zap,
    recover_nx_huge_pages,
    set_zap_policy,
)


class Vm(KvmState):
    """The front of one VM: creation, `apply` (the single mutating entry point, one handler
    per operation) and the queries. The state itself, and what the helper modules may call
    on it, is `KvmState` (state.py)."""

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        vm_type: object = 0,
        vcpus: object = 1,
        paging_levels: object = 4,
        name: str | None = None,
        table_budget: int = DEFAULT_TABLE_BUDGET,
        td_lifecycle: bool = False,
        host: object = None,
        engine_rev: int = ENGINE_REV,
    ) -> Vm:
        """KVM_CREATE_VM, plus `vcpus` KVM_CREATE_VCPU calls. `td_lifecycle`: a TD that goes
        through KVM_TDX_INIT_VM … FINALIZE_VM (tdx_lifecycle.py) instead of being runnable at
        once; its vCPUs are created after INIT_VM, so `vcpus` must be 0 (tdx_vcpu_create).
        `host`: the host's module parameters (host_profile.py), defaults as before."""
        t = caps.check_vm_type(vm_type)
        if paging_levels not in (4, 5) or isinstance(paging_levels, bool):
            raise einval("paging_levels must be 4 or 5")
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 0 <= vcpus <= 1024:
            raise einval("vcpus must be an integer in [0, 1024]")
        if not isinstance(td_lifecycle, bool):
            raise einval("td_lifecycle must be true or false")
        if td_lifecycle and t != VmType.KVM_X86_TDX_VM:
            raise einval("td_lifecycle applies to TDs (KVM_X86_TDX_VM) only")
        if td_lifecycle and vcpus:
            raise KvmError(errno.EIO, "a TD's vCPUs are created after KVM_TDX_INIT_VM (vcpus: 0)")
        profile = host_profile(host)
        vm = cls(t, vcpus, int(paging_levels), name, table_budget, td_lifecycle, profile)
        vm.set_engine_rev(engine_rev)
        return vm

    # ------------------------------------------------------------------ properties

    # ------------------------------------------------------------------ dispatch
    def apply(
        self,
        op: Op,
        at: float | None = None,
        durations: list[int] | None = None,
        answer: bool = True,
    ) -> dict[str, Any]:
        """The one entry point of every mutating call (journaled by the service).

        `at` stamps the call's zap events; `durations`, on replay, gives back the zap durations
        measured the first time (`last_durations` after the call), so replay is exact.
        `answer=False` (replay, which discards answers): the answer's memslot views are None
        and its zap events the VM's own (not copies); the state is the same.
        """
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise einval(f"unknown operation {op!r}")
        if (self.destroyed or self.bugged) and handler is not _destroy:
            if self.destroyed:
                raise KvmError(errno.EIO, "the VM has been destroyed")
            raise KvmError(errno.EIO, f"the VM is dead (KVM_BUG_ON: {self.bugged})")
        self.now = now = time.time() if at is None else at
        trace = self.mmu.trace
        trace.now, trace.cpu = now, -1
        self.replay_durations = list(durations) if durations else []
        self.last_durations = []
        self.answering = answer
        try:
            return handler(self, op)
        finally:
            self.answering = True  # what runs outside a call (a query) answers in full

    # ------------------------------------------------------------------ vCPUs / caps
    def check_extension(self, cap: object) -> int:
        return caps.vm_check_extension(cap, self.vm_type)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ memslots
    # ------------------------------------------------------------------ zapping
    # ------------------------------------------------------------------ MMIO SPTEs

    # ------------------------------------------------------------------ faults

    # ------------------------------------------------------------------ load / store
    # ------------------------------------------------------------------ host memory
    # ------------------------------------------------------------------ guest_memfd
    # ------------------------------------------------------------------ attributes
    # ------------------------------------------------------------------ dirty logging

    # ------------------------------------------------------------------ teardown
    # ------------------------------------------------------------------ queries
    def info(self) -> dict[str, Any]:
        return views.info(self)

    def quirks(self) -> dict[str, Any]:
        return caps.quirks_view(self.vm_type, self.disabled_quirks)

    def memslots(self) -> list[dict[str, Any]]:
        return views.memslots(self)

    def memslot(self, slot: object) -> dict[str, Any]:
        s = self.lookup_slot(slot)
        return memslots.slot_view(self, s)  # type: ignore[return-value]

    def vcpus_view(self) -> list[dict[str, Any]]:
        return [self.vcpus[i].to_dict() for i in sorted(self.vcpus)]

    def guest_memfds(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.gmem]

    def memory_attributes(self) -> list[dict[str, Any]]:
        return self.attrs.ranges()

    def zap_events(self) -> list[dict[str, Any]]:
        return list(reversed(self.events))

    def roots(self) -> list[views.RootView]:
        return views.roots(self)

    def stats(self) -> views.StatsView:
        return views.stats(self)

    def tdx_state(self) -> dict[str, object]:
        return views.tdx_state(self)

    def host_read(self, userspace_addr: object, len: object) -> dict[str, Any]:
        return hostmem.host_read(self, userspace_addr, len)

    def gmem_read(self, fd: object, offset: object, len: object) -> dict[str, Any]:
        return gmem.gmem_read(self, fd, offset, len)

    def translate(self, gpa: object) -> views.TranslateView:
        return views.translate(self, gpa)

    def mappings(self, root: object = None) -> list[views.MappingView]:
        return views.mappings(self, root)

    def iter_mappings(
        self, root: object = None, start: views.MappingStart = (0, 0)
    ) -> Iterator[views.MappingView]:
        return views.iter_mappings(self, root, start)

    def audit(self) -> dict[str, Any]:
        return audit_vm(self)


def _destroy(vm: KvmState, op: Destroy) -> dict[str, Any]:
    return destroy(vm)


def _get_dirty_log(vm: KvmState, op: GetDirtyLog) -> dict[str, Any]:
    return dirty.get_dirty_log(vm, op.slot)


def _clear_dirty_log(vm: KvmState, op: ClearDirtyLog) -> dict[str, Any]:
    return dirty.clear_dirty_log(vm, op.slot, op.first_page, op.num_pages, op.bitmap)


# Operation type -> its handler: dispatch is one dict lookup, no argument binding.
_HANDLERS: dict[type[Op], Callable[[Any, Any], dict[str, Any]]] = {
    CreateVcpu: vcpu_ops.create_vcpu,
    SetVcpuSmm: vcpu_ops.set_vcpu_smm,
    EnableCap: caps.enable_cap,
    SetUserMemoryRegion: memslots.set_user_memory_region,
    CreateGuestMemfd: gmem.create_guest_memfd,
    GmemFallocate: gmem.gmem_fallocate,
    GmemClose: gmem.gmem_close,
    GmemWrite: gmem.gmem_write,
    SetMemoryAttributes: attributes.set_memory_attributes,
    Access: accesses.access,
    Load: accesses.load,
    Store: accesses.store,
    PreFault: accesses.pre_fault,
    Accept: accesses.accept,
    HostWrite: hostmem.host_write,
    HostDiscard: hostmem.host_discard,
    HostAdvise: hostmem.host_advise,
    HostMap: hostmem.host_map,
    ExplicitZap: explicit_zap,
    GetDirtyLog: _get_dirty_log,
    ClearDirtyLog: _clear_dirty_log,
    SetZapPolicy: set_zap_policy,
    Destroy: _destroy,
    TdxInitVm: tdx_lifecycle.init_vm,
    TdxInitVcpu: tdx_lifecycle.init_vcpu,
    TdxInitMemRegion: tdx_lifecycle.init_mem_region,
    TdxFinalizeVm: tdx_lifecycle.finalize_vm,
    TdvmcallMapGpa: hypercall.map_gpa,
    Hypercall: hypercall.hypercall,
    RecoverNxHugePages: recover_nx_huge_pages,
    CompleteHypercall: hypercall.complete,
}
