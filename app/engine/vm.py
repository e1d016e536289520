"""`Vm`: the aggregate of one simulated KVM VM; one method per ioctl it models.

Every mutating call enters through `apply(op, args)` so the service can journal and replay it;
the engine is deterministic given the same calls and the same `at` timestamps.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import addr as A
from . import capabilities as caps
from . import dirty, hypercall, introspect, tdx_lifecycle, uapi
from . import spte as S
from .attributes import SetMemoryAttributes
from .audit import audit as audit_vm
from .capabilities import EnableCap
from .dirty import ClearDirtyLog, GetDirtyLog
from .errors import KvmError, check_u64, einval
from .faults import (
    ACCESS_KINDS,
    Accept,
    Access,
    FaultPath,
    Load,
    PreFault,
    Store,
    check_access_range,
)
from .gmem import CreateGuestMemfd, GmemClose, GmemFallocate, GmemFile, GmemWrite
from .host_profile import host_profile
from .hostmem import LEVEL_OF_SIZE, HostAdvise, HostDiscard, HostMap, HostWrite
from .hypercall import CompleteHypercall, Hypercall, TdvmcallMapGpa
from .memslots import (
    ChangeKind,
    Memslot,
    MemslotChange,
    SetUserMemoryRegion,
    check_arch_prepare,
    check_region,
)
from .op import Op
from .paging import span
from .revision import ENGINE_REV
from .roots import RootRole
from .state import DEFAULT_TABLE_BUDGET, KvmState
from .stats import stats_view
from .tdx_lifecycle import TdxFinalizeVm, TdxInitMemRegion, TdxInitVcpu, TdxInitVm
from .uapi import PAGE_SIZE, VmType
from .vcpu import CreateVcpu, SetVcpuSmm, Vcpu
from .zap import (
    Destroy,
    ExplicitZap,
    RecoverNxHugePages,
    SetZapPolicy,
    destroy,
    explicit_zap,
    flush_memslot,
    gmem_invalidate,
    notifier_invalidate,
    recover_nx_huge_pages,
    zap_all_fast,
    zap_gfn_range,
)

ZAP_POLICIES = ("kvm", "zap_all_shared_only")
MAX_ACCESS_BYTES = 1 << 40  # one call may touch at most 1 TiB
MAX_DATA_BYTES = 1 << 20  # bytes one host/guest_memfd read or write may carry
# A plain int: an int & an IntFlag member goes through the enum machinery (the memslot path
# tests it on every call).
_LOG_DIRTY = int(uapi.KVM_MEM_LOG_DIRTY_PAGES)
# A memslot answer's "change" as a plain str (an enum's `.value` is a descriptor call).
_CHANGE_NAMES = {k: k.value for k in ChangeKind}


def _hex_bytes(value: object, name: str = "data") -> bytes:
    if not isinstance(value, str):
        raise einval(f"{name} must be a hex string")
    s = value[2:] if value.startswith(("0x", "0X")) else value
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise einval(f"{name} is not valid hex") from None


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
        self, op: Op, at: float | None = None, durations: list[int] | None = None
    ) -> dict[str, Any]:
        """The one entry point of every mutating call (journaled by the service).

        `at` stamps the call's zap events; `durations`, on replay, gives back the zap durations
        measured the first time (`last_durations` after the call), so replay is exact.
        """
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise einval(f"unknown operation {op!r}")
        if self.destroyed and handler is not _destroy:
            raise KvmError(errno.EIO, "the VM has been destroyed")
        if self.bugged and handler is not _destroy:
            raise KvmError(errno.EIO, f"the VM is dead (KVM_BUG_ON: {self.bugged})")
        self.now = time.time() if at is None else at
        self.mmu.trace.now, self.mmu.trace.cpu = self.now, -1
        self.replay_durations = list(durations or [])
        self.last_durations = []
        return handler(self, op)

    # ------------------------------------------------------------------ vCPUs / caps
    def _create_vcpu(self, op: CreateVcpu) -> dict[str, Any]:
        """KVM_CREATE_VCPU: id < KVM_MAX_VCPU_IDS (4096, x86), at most KVM_MAX_VCPUS (1024)
        vCPUs, an id only once (EEXIST) — kvm_vm_ioctl_create_vcpu."""
        id = op.id
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < 4096:
            raise einval("vCPU id must be in [0, 4096)")
        tdx_lifecycle.check_can_create_vcpu(self)
        if id in self.vcpus:
            raise KvmError(errno.EEXIST, f"vCPU {id} already exists")
        if len(self.vcpus) >= 1024:
            raise einval("KVM_MAX_VCPUS reached")
        self.vcpus[id] = Vcpu(id)
        return {"id": id}

    def _set_vcpu_smm(self, op: SetVcpuSmm) -> dict[str, Any]:
        """KVM_SET_VCPU_EVENTS(smm.smm): the vCPU enters or leaves SMM, so its accesses use
        memslot address space 1 and the SMM roots (VMs without private memory only)."""
        vcpu, smm = op.vcpu, op.smm
        v = self.vcpu(vcpu)
        if not isinstance(smm, bool):
            raise einval("smm must be true or false")
        if smm and self.nr_as < 2:
            raise einval("this VM type has no SMM address space")
        v.as_id = 1 if smm else 0
        return v.to_dict()

    def _enable_cap(self, op: EnableCap) -> dict[str, Any]:
        cap, flags, args = op.cap, op.flags, op.args
        number = caps.cap_number(cap)
        args = [0, 0, 0, 0] if args is None else args
        if number in (uapi.Cap.KVM_CAP_DISABLE_QUIRKS, uapi.Cap.KVM_CAP_DISABLE_QUIRKS2):
            self.disabled_quirks = caps.disable_quirks(self.disabled_quirks, number, flags, args)
        elif number == uapi.Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            self.manual_dirty_log = caps.check_manual_dirty_log(flags, args)
        elif number == uapi.Cap.KVM_CAP_EXIT_HYPERCALL:
            self.hypercall_exit_enabled = caps.check_exit_hypercall(flags, args)
        else:
            raise einval(f"KVM_ENABLE_CAP does not support capability {number}")
        return {}

    def check_extension(self, cap: object) -> int:
        return caps.vm_check_extension(cap, self.vm_type)  # type: ignore[arg-type]

    def _set_zap_policy(self, op: SetZapPolicy) -> dict[str, Any]:
        policy = op.policy
        if policy not in ZAP_POLICIES:
            raise einval(f"policy must be one of {ZAP_POLICIES}")
        self.zap_policy = str(policy)
        return {}

    # ------------------------------------------------------------------ memslots
    def _set_user_memory_region(self, op: SetUserMemoryRegion) -> dict[str, Any]:
        change = check_region(
            op,
            vm_type=self.vm_type,
            spaces=self.spaces,
            gmem=self.gmem,
            user_addr_end=self.user_addr_end,
        )
        kind, old, new = change.kind, change.old, change.new
        if kind is ChangeKind.NONE:
            return {"change": _CHANGE_NAMES[kind], "memslot": self._slot_dict(old), "zap": None}
        if kind is ChangeKind.CREATE:
            check_arch_prepare(change, max_gfn=self.max_gfn, gfn_direct_bits=self.gfn_direct_bits)
            assert new is not None
            if new.guest_memfd is not None:
                self.gmem.bind(
                    new.guest_memfd, new.guest_memfd_offset, new.npages, (new.as_id, new.id)
                )
            self.spaces[new.as_id].install(new)
            self._swap(new.as_id)
            if new.flags & _LOG_DIRTY:
                self.alloc_dirty(new)
            return {"change": _CHANGE_NAMES[kind], "memslot": self._slot_dict(new), "zap": None}
        if kind is ChangeKind.FLAGS_ONLY:
            assert old is not None and new is not None
            space = self.spaces[old.as_id]
            space.remove(old.id)
            space.install(new)
            self._swap(new.as_id)
            zap = self._apply_dirty_flags(old, new)
            return {"change": _CHANGE_NAMES[kind], "memslot": self._slot_dict(new), "zap": zap}
        assert old is not None
        return self._delete_or_move(change, old, new)

    def _delete_or_move(
        self, change: MemslotChange, old: Memslot, new: Memslot | None
    ) -> dict[str, Any]:
        # DELETE and MOVE: publish the INVALID slot, flush it from the MMU, then finish.
        space = self.spaces[old.as_id]
        old.invalid = True
        self._swap(old.as_id)
        cause = "memslot_delete" if change.kind is ChangeKind.DELETE else "memslot_move"
        zap = flush_memslot(self, old, cause)
        if change.kind is ChangeKind.MOVE:
            assert new is not None
            try:
                check_arch_prepare(
                    change, max_gfn=self.max_gfn, gfn_direct_bits=self.gfn_direct_bits
                )
            except KvmError as e:
                # The kernel restores the old slot; the zap is not undone
                # (kvm-memslots.md §2.1 V21).
                old.invalid = False
                self._swap(old.as_id)
                e.state_changed = True
                raise
            space.remove(old.id)
            space.install(new)
            key = (old.as_id, old.id)
            if not new.flags & _LOG_DIRTY:
                self.free_dirty(key)
            elif key not in self.dirty:
                self.alloc_dirty(new)
            self._swap(new.as_id)
            moved = self._slot_dict(new)
            return {"change": _CHANGE_NAMES[change.kind], "memslot": moved, "zap": zap}
        space.remove(old.id)
        self.free_dirty((old.as_id, old.id))
        if old.guest_memfd is not None:
            self.gmem.unbind(old.guest_memfd, (old.as_id, old.id))
        self._swap(old.as_id)
        return {"change": _CHANGE_NAMES[change.kind], "memslot": None, "zap": zap}

    def _slot_dict(self, slot: Memslot | None) -> dict[str, Any] | None:
        if slot is None:
            return None
        d: dict[str, Any] = slot.to_dict()
        d["flag_names"] = uapi.flag_names(uapi.MemFlag, slot.flags)
        d["mapped"] = self._slot_mapped(slot)
        d["dirty_logging"] = (slot.as_id, slot.id) in self.dirty
        return d

    def _slot_mapped(self, slot: Memslot) -> dict[str, int]:
        """Present leaves inside the slot, in 4 KiB pages, per root role."""
        out = {"shared": 0, "private": 0}
        for root in self.mmu.roots_of(slot.as_id):
            bits = self.gfn_direct_bits if root.role is RootRole.DIRECT else 0
            n = self.mmu.mapped_pages(root, slot.base_gfn | bits, slot.end_gfn | bits)
            if root.role is RootRole.MIRROR:
                out["private"] += n
            elif self.has_private_mem and not self.is_tdx:
                priv = self.mmu.mapped_pages(root, slot.base_gfn, slot.end_gfn, gmem=True)
                out["private"] += priv
                out["shared"] += n - priv
            else:
                out["shared"] += n
        out["total"] = out["shared"] + out["private"]
        return out

    def _swap(self, as_id: int) -> None:
        """A new memslot array is published: generation += nr_as (kvm-memslots.md §2.3); if the
        MMIO generation wraps to 0, a fast zap (kvm-memslots.md §5.4)."""
        space = self.spaces[as_id]
        space.generation += self.nr_as
        gen = space.generation & ~(self.nr_as - 1) & ((1 << 19) - 1)
        if gen == 0:
            self.stats_extra["memslot_generation_wraps"] += 1
            zap_all_fast(self, "mmio_gen_wrap")

    # ------------------------------------------------------------------ zapping
    # ------------------------------------------------------------------ MMIO SPTEs

    # ------------------------------------------------------------------ faults

    def _access(self, op: Access) -> dict[str, Any]:
        vcpu, gpa, size, access, private = op.vcpu, op.gpa, op.size, op.access, op.private
        v = self.vcpu(vcpu)
        if access not in ACCESS_KINDS:
            raise einval("access must be read, write or exec")
        g, n = check_access_range(self, gpa, size, MAX_ACCESS_BYTES)
        self._check_private_hint(private, g)
        self._check_budget(self._budget_for(n))
        tdx_lifecycle.check_can_run(self, v)
        v.running = True
        return FaultPath(self, v, str(access)).run(g, n).to_dict()

    def _check_private_hint(self, private: object, gpa: int) -> None:
        """vkmmu's check of the API's `private` flag against how KVM classifies the access
        (kvm-private-tdx.md §2.1): the GPA's shared bit on a TD, attributes otherwise."""
        if private is None:
            return
        if not isinstance(private, bool):
            raise einval("private must be true, false or null")
        if self.is_tdx:
            if private == A.is_shared(A.gpa_to_gfn(gpa), self.gfn_direct_bits):
                raise einval("private contradicts the GPA's shared bit")
        elif private and not self.has_private_mem:
            raise einval("this VM type has no private memory")

    def _pre_fault(self, op: PreFault) -> dict[str, Any]:
        """KVM_PRE_FAULT_MEMORY (kvm-private-tdx.md §2.8): returns what is left of the range."""
        vcpu, gpa, size, flags = op.vcpu, op.gpa, op.size, op.flags
        v = self.vcpu(vcpu)
        g, n = self._check_pre_fault(gpa, size, flags)
        self._check_budget(self._budget_for(n))
        start, end = A.gpa_to_gfn(g), A.gpa_to_gfn(g + n)
        gfn = start
        err: KvmError | None = None
        # One prefetch walk per run of equal privacy: private runs map through the mirror
        # root (TDX) or from guest_memfd, shared ones through the direct root
        # (kvm-private-tdx.md §2.8 step 4).
        for a, b, attrs in self.attrs.pieces(start, end):
            private = self.has_private_mem and attrs != 0
            bits = self.gfn_direct_bits if not private else 0
            fp = FaultPath(self, v, "write" if private else "read", prefetch=True)
            res = fp.run(A.gfn_to_gpa(A.shared_alias(a, bits)), A.gfn_to_gpa(b - a))
            gfn = A.Gfn(a + res.pages)
            if res.exit is not None:
                reason = res.exit["reason"]
                err = (
                    KvmError(errno.ENOENT, f"no memslot at gpa {A.gfn_to_gpa(gfn):#x}")
                    if reason == "KVM_EXIT_MMIO"
                    else KvmError(errno.EFAULT, f"pre-fault at {A.gfn_to_gpa(gfn):#x}: {reason}")
                )
                break
        left = A.gfn_to_gpa(end - gfn)
        if err is not None and gfn == start:
            # The walk may have built a root, tables or an MMIO SPTE before failing, as the
            # kernel's does: the service journals such an error like a success.
            err.state_changed = True
            raise err
        return {"gpa": A.gfn_to_gpa(gfn), "size": left}

    def _check_pre_fault(self, gpa: object, size: object, flags: object) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY's argument rules (kvm-private-tdx.md §2.8 step 1)."""
        g, n, f = check_u64(gpa, "gpa"), check_u64(size, "size"), check_u64(flags, "flags")
        if f or g & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1) or g + n <= g:
            raise einval("flags must be 0; gpa/size page aligned; size > 0, no wrap")
        if self.tdx is not None and not self.tdx.runnable:
            # kvm_arch_vcpu_pre_fault_memory: pre_fault_allowed is set by TD finalize.
            raise KvmError(errno.EOPNOTSUPP, "KVM_PRE_FAULT_MEMORY before KVM_TDX_FINALIZE_VM")
        if A.is_shared(A.gpa_to_gfn(g), self.gfn_direct_bits):
            raise einval("the GPA is a shared-bit alias")
        if g + n > self.gpa_limit:
            raise einval("range beyond the guest physical address space")
        if n > MAX_ACCESS_BYTES:
            raise KvmError(errno.E2BIG, f"one call covers at most {MAX_ACCESS_BYTES:#x} bytes")
        return g, n

    def _accept(self, op: Accept) -> dict[str, Any]:
        """A TD guest's TDG.MEM.PAGE.ACCEPT: AUG the page if it is missing, then accept it."""
        vcpu, gpa, size = op.vcpu, op.gpa, op.size
        if self.tdx is None:
            raise einval("TDG.MEM.PAGE.ACCEPT exists only in a TD (KVM_X86_TDX_VM)")
        v = self.vcpu(vcpu)
        g, n = check_u64(gpa, "gpa"), check_u64(size, "size")
        if n == 0 or g & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1) or g + n > self.gpa_limit:
            raise einval("gpa/size must be page aligned, non-empty, inside the GPA space")
        if A.is_shared(A.gpa_to_gfn(g), self.gfn_direct_bits):
            raise einval("only private GPAs are accepted")
        if n > MAX_ACCESS_BYTES:
            raise KvmError(errno.E2BIG, f"one call covers at most {MAX_ACCESS_BYTES:#x} bytes")
        self._check_budget(self._budget_for(n))
        tdx_lifecycle.check_can_run(self, v)
        v.running = True
        gfn = A.gpa_to_gfn(g)
        # ACCEPT of a missing page is an EPT violation: KVM AUGs it (a prefetch-like walk that
        # maps without touching), then the module accepts it.
        res = FaultPath(self, v, "write", prefetch=True).run(g, n)
        stop = gfn + res.pages
        self._zero_on_accept(gfn, stop)
        accepted, reaccepted = self.tdx.accept(gfn, stop - gfn)
        result = res.exit
        return {"accepted": accepted, "reaccepted": reaccepted, "exit": result}

    def _zero_on_accept(self, gfn: int, end: int) -> None:
        """TDG.MEM.PAGE.ACCEPT hands the guest a zeroed page: what an earlier mapping of the
        same guest_memfd page held is gone (a zapped private page loses its contents)."""
        assert self.tdx is not None
        if end <= gfn:
            return
        fresh = ~self.tdx.accepted_mask(gfn, end - gfn)
        for a, b in _bool_runs(fresh):
            for slot in self.spaces[0].overlapping(gfn + a, b - a):
                file = self.gmem.lookup(slot.guest_memfd)
                if file is None or not file.contents:
                    continue
                g0, g1 = max(gfn + a, slot.base_gfn), min(gfn + b, slot.end_gfn)
                lo, hi = slot.gmem_index(g0), slot.gmem_index(g1)
                for index in [i for i in file.contents if lo <= i < hi]:
                    del file.contents[index]

    # ------------------------------------------------------------------ load / store
    def _load(self, op: Load) -> dict[str, Any]:
        vcpu, gpa, private = op.vcpu, op.gpa, op.private
        length = check_u64(op.len, "len")
        if not 0 < length <= PAGE_SIZE:
            raise einval("len must be in [1, 4096]")
        return self._data_access(vcpu, gpa, length, None, private)

    def _store(self, op: Store) -> dict[str, Any]:
        vcpu, gpa, data, private = op.vcpu, op.gpa, op.data, op.private
        payload = _hex_bytes(data)
        if not 0 < len(payload) <= PAGE_SIZE:
            raise einval("data must hold 1 to 4096 bytes")
        return self._data_access(vcpu, gpa, len(payload), payload, private)

    def _data_access(
        self, vcpu: object, gpa: object, length: int, payload: bytes | None, private: object
    ) -> dict[str, Any]:
        v = self.vcpu(vcpu)
        g, _ = check_access_range(self, gpa, length, PAGE_SIZE)
        self._check_private_hint(private, g)
        self._check_budget(self._budget_for(length))
        tdx_lifecycle.check_can_run(self, v)
        v.running = True
        res = FaultPath(self, v, "read" if payload is None else "write").run(g, length)
        if res.exit is not None:
            return {"exit": res.exit}
        out = bytearray()
        pos = g
        end = g + length
        while pos < end:
            n = min(end - pos, PAGE_SIZE - (pos & (PAGE_SIZE - 1)))
            src = self._backing(v, pos)
            if payload is None:
                out += src.read(n)
            else:
                src.write(payload[pos - g : pos - g + n])
            pos += n
        return {"data": out.hex()} if payload is None else {}

    def _backing(self, vcpu: Vcpu, gpa: int) -> _Backing:
        """Where the SPTE for `gpa` points: a host page or a guest_memfd page."""
        pos = A.gpa_to_gfn(gpa)
        gfn = pos & ~self.gfn_direct_bits
        private = self.is_tdx and not pos & self.gfn_direct_bits
        root = self.root_for(vcpu, RootRole.MIRROR if private else RootRole.DIRECT)
        _t, _i, level, e = self.mmu.lookup(root, pos)
        assert e & S.SPTE_MMU_PRESENT, "the fault path left the page unmapped"
        pfn = S.pfn_of(e) + (pos & (span(level) - 1))
        off = gpa & (PAGE_SIZE - 1)
        owner = self.gmem.pfn_owner(pfn)
        if owner is not None:
            return _Backing(self, owner[0], owner[1], off)
        del gfn
        return _Backing(self, None, pfn, off)

    # ------------------------------------------------------------------ host memory
    def _host_range(self, addr: object, length: object) -> tuple[int, int]:
        a, n = check_u64(addr, "userspace_addr"), check_u64(length, "len")
        if n == 0 or a + n > self.user_addr_end:
            raise einval("range must be non-empty and inside the user address space")
        return a, n

    def host_read(self, userspace_addr: object, len: object) -> dict[str, Any]:
        a, n = self._host_range(userspace_addr, len)
        if n > MAX_DATA_BYTES:
            raise KvmError(errno.E2BIG, "read at most 1 MiB at once")
        return {"data": self.host.read(a, n).hex()}

    def _host_write(self, op: HostWrite) -> dict[str, Any]:
        userspace_addr, data = op.userspace_addr, op.data
        payload = _hex_bytes(data)
        if len(payload) > MAX_DATA_BYTES:
            raise KvmError(errno.E2BIG, "write at most 1 MiB at once")
        a, _ = self._host_range(userspace_addr, max(1, len(payload)))
        if payload:
            # A write through the VMM's mapping breaks nothing KVM maps: same pfn, new bytes.
            self.host.write(a, payload)
        return {"written": len(payload)}

    def _host_discard(self, op: HostDiscard) -> dict[str, Any]:
        """madvise(MADV_DONTNEED): the MMU notifier zaps every SPTE mapping the range."""
        userspace_addr, len = op.userspace_addr, op.len
        a, n = self._host_range(userspace_addr, len)
        if a & (PAGE_SIZE - 1):
            raise einval("madvise needs a page-aligned address")
        first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n + A.PAGE_MASK)
        lo, hi = self.host.dontneed_range(first, end)
        first, end = A.Hpn(lo), A.Hpn(hi)
        if first >= end:
            return {"zap": None}
        zap = notifier_invalidate(self, first, end)
        self.host.discard(first, end)
        return {"zap": zap}

    def _host_advise(self, op: HostAdvise) -> dict[str, Any]:
        userspace_addr, len, advice = op.userspace_addr, op.len, op.advice
        a, n = self._host_range(userspace_addr, len)
        if a & (PAGE_SIZE - 1) or advice not in ("hugepage", "nohugepage"):
            raise einval("page-aligned address; advice hugepage|nohugepage")
        first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n + A.PAGE_MASK)
        # MADV_NOHUGEPAGE does not split existing THPs; KVM's SPTEs stay as they are.
        self.host.advise(first, end, advice == "hugepage")
        return {}

    def _host_map(self, op: HostMap) -> dict[str, Any]:
        """An mmap of hugetlbfs: the range is backed by pages of `page_size`."""
        userspace_addr, len, page_size = op.userspace_addr, op.len, op.page_size
        a, n = self._host_range(userspace_addr, len)
        if (
            not isinstance(page_size, int)
            or isinstance(page_size, bool)
            or (page_size not in LEVEL_OF_SIZE)
        ):
            raise einval("page_size must be 4096, 2097152 or 1073741824")
        ps = int(page_size)
        if a % ps or n % ps:
            raise einval("hugetlbfs mappings are aligned to their page size")
        first, end = A.hva_to_hpn(a), A.hva_to_hpn(a + n)
        zap = notifier_invalidate(self, first, end)
        self.host.discard(first, end)
        self.host.set_page_size(first, end, LEVEL_OF_SIZE[ps], "hugetlb")
        return {"zap": zap}

    # ------------------------------------------------------------------ guest_memfd
    def _create_guest_memfd(self, op: CreateGuestMemfd) -> dict[str, Any]:
        size, flags = op.size, op.flags
        return self.gmem.create(size, flags, vm_type=self.vm_type).to_dict()

    def _gmem_fallocate(self, op: GmemFallocate) -> dict[str, Any]:
        fd, mode, offset, len = op.fd, op.mode, op.offset, op.len
        file, punch, first, count = self.gmem.check_fallocate(fd, mode, offset, len)
        if not punch:
            return {"allocated": file.allocate(first, count), "zap": None}
        zap = gmem_invalidate(self, file, first, first + count, "punch_hole")
        return {"freed": file.punch(first, count), "zap": zap}

    def _gmem_close(self, op: GmemClose) -> dict[str, Any]:
        fd = op.fd
        file = self.gmem.get(fd)
        zap = gmem_invalidate(self, file, 0, file.npages, "gmem_close")
        self.gmem.close(fd)
        return {"zap": zap}

    def _gmem_write(self, op: GmemWrite) -> dict[str, Any]:
        fd, offset, data = op.fd, op.offset, op.data
        file = self._mappable(fd)
        payload = _hex_bytes(data)
        if len(payload) > MAX_DATA_BYTES:
            raise KvmError(errno.E2BIG, "write at most 1 MiB at once")
        off = check_u64(offset, "offset")
        if off + len(payload) > file.size:
            raise einval("write beyond the end of the file")
        file.write(off, payload)
        return {"written": len(payload)}

    def gmem_read(self, fd: object, offset: object, len: object) -> dict[str, Any]:
        file = self._mappable(fd)
        off, n = check_u64(offset, "offset"), check_u64(len, "len")
        if n > MAX_DATA_BYTES:
            raise KvmError(errno.E2BIG, "read at most 1 MiB at once")
        if off + n > file.size:
            raise einval("read beyond the end of the file")
        return {"data": file.read(off, n).hex()}

    def _mappable(self, fd: object) -> GmemFile:
        file = self.gmem.get(fd)
        if not file.flags & uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP or file.closed:
            # mmap() of a guest_memfd without GUEST_MEMFD_FLAG_MMAP fails with ENODEV.
            raise KvmError(errno.ENODEV, "only MMAP guest_memfd files can be read or written")
        if not file.flags & uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED:
            # kvm_gmem_fault_user_mapping: SIGBUS unless the memory is shared.
            raise KvmError(errno.EFAULT, "guest_memfd memory is not shared (no INIT_SHARED)")
        return file

    # ------------------------------------------------------------------ attributes
    def _set_memory_attributes(self, op: SetMemoryAttributes) -> dict[str, Any]:
        address, size, attributes, flags = op.address, op.size, op.attributes, op.flags
        start, end = self.attrs.check(address, size, attributes, flags, vm_type=self.vm_type)
        attrs = int(attributes)
        if self.attrs.pieces(start, end) == [(start, end, attrs)]:
            # Identical attributes: no invalidation at all (kvm-private-tdx.md §3.2 step 5).
            return {"zap": None, "changed": False}
        zap = None
        to_private = bool(attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        if self.has_private_mem:
            # Zap the view being left, exactly [start, end): a huge leaf straddling the range
            # intersects it and goes too (mmu.c: only the head/tail huge regions join the
            # in-progress invalidation, the unmap itself is the changed range).
            leaving_mirror = self.is_tdx and not to_private
            roles = {RootRole.MIRROR} if leaving_mirror else {RootRole.DIRECT}
            if any(sp.overlapping(start, end - start) for sp in self.spaces):
                zap = zap_gfn_range(self, [0], start, end, roles, "attributes", "zap_gfn_range")
        self.attrs.set(start, end, attrs)
        return {"zap": zap, "changed": True}

    # ------------------------------------------------------------------ dirty logging

    def _apply_dirty_flags(self, old: Memslot, new: Memslot) -> dict[str, Any] | None:
        return dirty.apply_flags(self, old, new)

    def _get_dirty_log(self, op: GetDirtyLog) -> dict[str, Any]:
        return dirty.get_dirty_log(self, op.slot)

    def _clear_dirty_log(self, op: ClearDirtyLog) -> dict[str, Any]:
        slot, first_page, num_pages, bitmap = op.slot, op.first_page, op.num_pages, op.bitmap
        return dirty.clear_dirty_log(self, slot, first_page, num_pages, bitmap)

    # ------------------------------------------------------------------ teardown
    # ------------------------------------------------------------------ queries
    def info(self) -> dict[str, Any]:
        return {
            "vm_type": int(self.vm_type),
            "vm_type_name": self.vm_type.name,
            "name": self.name,
            "vcpus": len(self.vcpus),
            "paging_levels": self.paging_levels,
            "nr_address_spaces": self.nr_as,
            "has_private_mem": self.has_private_mem,
            "gfn_direct_bits": self.gfn_direct_bits,
            "zap_policy": self.zap_policy,
            "slot_zap_all_applies": self.vm_type == VmType.KVM_X86_DEFAULT_VM
            and self.quirk_zap_all,
            "memslots": sum(len(s) for s in self.spaces),
            "destroyed": self.destroyed,
            "host": self.host_profile.to_dict(),
            "engine_rev": self.engine_rev,
        }

    def quirks(self) -> dict[str, Any]:
        return caps.quirks_view(self.vm_type, self.disabled_quirks)

    def memslots(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for space in self.spaces:
            for slot in space:
                out.append(self._slot_dict(slot) or {})
        return sorted(out, key=lambda d: d["slot"])

    def memslot(self, slot: object) -> dict[str, Any]:
        s = self.lookup_slot(slot)
        return self._slot_dict(s)  # type: ignore[return-value]

    def vcpus_view(self) -> list[dict[str, Any]]:
        return [self.vcpus[i].to_dict() for i in sorted(self.vcpus)]

    def guest_memfds(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.gmem]

    def memory_attributes(self) -> list[dict[str, Any]]:
        return self.attrs.ranges()

    def zap_events(self) -> list[dict[str, Any]]:
        return list(reversed(self.events))

    def roots(self) -> list[dict[str, Any]]:
        return [r.to_dict(self.mmu.mmu_valid_gen) for r in self.mmu.roots_of()]

    def stats(self) -> dict[str, Any]:
        return stats_view(self)

    def tdx_state(self) -> dict[str, Any]:
        if self.tdx is None:
            raise einval("not a TD")
        pending = [
            {"vcpu": v, "next_gpa": a, "end_gpa": b}
            for v, (a, b) in sorted(self.tdx.map_gpa.items())
        ]
        return {
            **self.tdx.to_dict(),
            "lifecycle": self.tdx.lifecycle_dict(),
            "map_gpa_pending": pending,
        }

    def translate(self, gpa: object) -> dict[str, Any]:
        return introspect.translate(self, gpa)

    def mappings(self, root: object = None) -> list[dict[str, Any]]:
        return introspect.mappings(self, root)

    def iter_mappings(
        self, root: object = None, start: introspect.MappingStart = (0, 0)
    ) -> Iterator[dict[str, Any]]:
        return introspect.iter_mappings(self, root, start)

    def audit(self) -> dict[str, Any]:
        return audit_vm(self)


def _bool_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) runs of True in a bool array."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


class _Backing:
    """A page as the CPU reaches it through an SPTE."""

    def __init__(self, vm: Vm, file: GmemFile | None, page: int, off: int) -> None:
        self.vm, self.file, self.page, self.off = vm, file, page, off

    def read(self, n: int) -> bytes:
        if self.file is not None:
            return self.file.read(A.page_to_offset(self.page) + self.off, n)
        return self.vm.host.read(A.hpn_to_hva(self.page) + self.off, n)

    def write(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(A.page_to_offset(self.page) + self.off, data)
        else:
            self.vm.host.write(A.hpn_to_hva(self.page) + self.off, data)


def _destroy(vm: Vm, op: Destroy) -> dict[str, Any]:
    return destroy(vm)


# Operation type -> its handler: dispatch is one dict lookup, no argument binding.
_HANDLERS: dict[type[Op], Callable[[Vm, Any], dict[str, Any]]] = {
    CreateVcpu: Vm._create_vcpu,
    SetVcpuSmm: Vm._set_vcpu_smm,
    EnableCap: Vm._enable_cap,
    SetUserMemoryRegion: Vm._set_user_memory_region,
    CreateGuestMemfd: Vm._create_guest_memfd,
    GmemFallocate: Vm._gmem_fallocate,
    GmemClose: Vm._gmem_close,
    GmemWrite: Vm._gmem_write,
    SetMemoryAttributes: Vm._set_memory_attributes,
    Access: Vm._access,
    Load: Vm._load,
    Store: Vm._store,
    PreFault: Vm._pre_fault,
    Accept: Vm._accept,
    HostWrite: Vm._host_write,
    HostDiscard: Vm._host_discard,
    HostAdvise: Vm._host_advise,
    HostMap: Vm._host_map,
    ExplicitZap: explicit_zap,
    GetDirtyLog: Vm._get_dirty_log,
    ClearDirtyLog: Vm._clear_dirty_log,
    SetZapPolicy: Vm._set_zap_policy,
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
