"""The guest's memory accesses: KVM_RUN faults (`access`), loads and stores that read or write
the bytes behind the SPTE, KVM_PRE_FAULT_MEMORY and a TD's TDG.MEM.PAGE.ACCEPT."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import numpy as np

from . import addr as A
from . import spte as S
from . import tdx_lifecycle
from .errors import KvmError, check_u64, einval, hex_bytes
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
from .paging import span
from .roots import RootRole
from .uapi import PAGE_SIZE

if TYPE_CHECKING:
    from .gmem import GmemFile
    from .state import KvmState
    from .vcpu import Vcpu

MAX_ACCESS_BYTES = 1 << 40  # one call may touch at most 1 TiB


def access(vm: KvmState, op: Access) -> dict[str, Any]:
    vcpu, gpa, size, access, private = op.vcpu, op.gpa, op.size, op.access, op.private
    v = vm.vcpu(vcpu)
    if access not in ACCESS_KINDS:
        raise einval("access must be read, write or exec")
    g, n = check_access_range(vm, gpa, size, MAX_ACCESS_BYTES)
    _check_private_hint(vm, private, g)
    vm.check_table_budget(n)
    tdx_lifecycle.check_can_run(vm, v)
    v.running = True
    return FaultPath(vm, v, str(access)).run(g, n).to_dict()


def _check_private_hint(vm: KvmState, private: object, gpa: int) -> None:
    """vkmmu's check of the API's `private` flag against how KVM classifies the access
    (kvm-private-tdx.md §2.1): the GPA's shared bit on a TD, attributes otherwise."""
    if private is None:
        return
    if not isinstance(private, bool):
        raise einval("private must be true, false or null")
    if vm.is_tdx:
        if private == A.is_shared(A.gpa_to_gfn(gpa), vm.gfn_direct_bits):
            raise einval("private contradicts the GPA's shared bit")
    elif private and not vm.has_private_mem:
        raise einval("this VM type has no private memory")


def pre_fault(vm: KvmState, op: PreFault) -> dict[str, Any]:
    """KVM_PRE_FAULT_MEMORY (kvm-private-tdx.md §2.8): returns what is left of the range."""
    vcpu, gpa, size, flags = op.vcpu, op.gpa, op.size, op.flags
    v = vm.vcpu(vcpu)
    g, n = _check_pre_fault(vm, gpa, size, flags)
    vm.check_table_budget(n)
    start, end = A.gpa_to_gfn(g), A.gpa_to_gfn(g + n)
    gfn = start
    err: KvmError | None = None
    # One prefetch walk per run of equal privacy: private runs map through the mirror
    # root (TDX) or from guest_memfd, shared ones through the direct root
    # (kvm-private-tdx.md §2.8 step 4).
    for a, b, attrs in vm.attrs.pieces(start, end):
        private = vm.has_private_mem and attrs != 0
        bits = vm.gfn_direct_bits if not private else 0
        fp = FaultPath(vm, v, "write" if private else "read", prefetch=True)
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


def _check_pre_fault(vm: KvmState, gpa: object, size: object, flags: object) -> tuple[int, int]:
    """KVM_PRE_FAULT_MEMORY's argument rules (kvm-private-tdx.md §2.8 step 1)."""
    g, n, f = check_u64(gpa, "gpa"), check_u64(size, "size"), check_u64(flags, "flags")
    if f or g & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1) or g + n <= g:
        raise einval("flags must be 0; gpa/size page aligned; size > 0, no wrap")
    if vm.tdx is not None and not vm.tdx.runnable:
        # kvm_arch_vcpu_pre_fault_memory: pre_fault_allowed is set by TD finalize.
        raise KvmError(errno.EOPNOTSUPP, "KVM_PRE_FAULT_MEMORY before KVM_TDX_FINALIZE_VM")
    if A.is_shared(A.gpa_to_gfn(g), vm.gfn_direct_bits):
        raise einval("the GPA is a shared-bit alias")
    if g + n > vm.gpa_limit:
        raise einval("range beyond the guest physical address space")
    if n > MAX_ACCESS_BYTES:
        raise KvmError(errno.E2BIG, f"one call covers at most {MAX_ACCESS_BYTES:#x} bytes")
    return g, n


def accept(vm: KvmState, op: Accept) -> dict[str, Any]:
    """A TD guest's TDG.MEM.PAGE.ACCEPT: AUG the page if it is missing, then accept it."""
    vcpu, gpa, size = op.vcpu, op.gpa, op.size
    if vm.tdx is None:
        raise einval("TDG.MEM.PAGE.ACCEPT exists only in a TD (KVM_X86_TDX_VM)")
    v = vm.vcpu(vcpu)
    g, n = check_u64(gpa, "gpa"), check_u64(size, "size")
    if n == 0 or g & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1) or g + n > vm.gpa_limit:
        raise einval("gpa/size must be page aligned, non-empty, inside the GPA space")
    if A.is_shared(A.gpa_to_gfn(g), vm.gfn_direct_bits):
        raise einval("only private GPAs are accepted")
    if n > MAX_ACCESS_BYTES:
        raise KvmError(errno.E2BIG, f"one call covers at most {MAX_ACCESS_BYTES:#x} bytes")
    vm.check_table_budget(n)
    tdx_lifecycle.check_can_run(vm, v)
    v.running = True
    gfn = A.gpa_to_gfn(g)
    # ACCEPT of a missing page is an EPT violation: KVM AUGs it (a prefetch-like walk that
    # maps without touching), then the module accepts it.
    res = FaultPath(vm, v, "write", prefetch=True).run(g, n)
    stop = gfn + res.pages
    _zero_on_accept(vm, gfn, stop)
    accepted, reaccepted = vm.tdx.accept(gfn, stop - gfn)
    result = res.exit
    return {"accepted": accepted, "reaccepted": reaccepted, "exit": result}


def _zero_on_accept(vm: KvmState, gfn: int, end: int) -> None:
    """TDG.MEM.PAGE.ACCEPT hands the guest a zeroed page: what an earlier mapping of the
    same guest_memfd page held is gone (a zapped private page loses its contents)."""
    assert vm.tdx is not None
    if end <= gfn:
        return
    fresh = ~vm.tdx.accepted_mask(gfn, end - gfn)
    for a, b in _bool_runs(fresh):
        for slot in vm.spaces[0].overlapping(gfn + a, b - a):
            file = vm.gmem.lookup(slot.guest_memfd)
            if file is None or not file.contents:
                continue
            g0, g1 = max(gfn + a, slot.base_gfn), min(gfn + b, slot.end_gfn)
            lo, hi = slot.gmem_index(g0), slot.gmem_index(g1)
            for index in [i for i in file.contents if lo <= i < hi]:
                del file.contents[index]


def load(vm: KvmState, op: Load) -> dict[str, Any]:
    vcpu, gpa, private = op.vcpu, op.gpa, op.private
    length = check_u64(op.len, "len")
    if not 0 < length <= PAGE_SIZE:
        raise einval("len must be in [1, 4096]")
    return _data_access(vm, vcpu, gpa, length, None, private)


def store(vm: KvmState, op: Store) -> dict[str, Any]:
    vcpu, gpa, data, private = op.vcpu, op.gpa, op.data, op.private
    payload = hex_bytes(data)
    if not 0 < len(payload) <= PAGE_SIZE:
        raise einval("data must hold 1 to 4096 bytes")
    return _data_access(vm, vcpu, gpa, len(payload), payload, private)


def _data_access(
    vm: KvmState, vcpu: object, gpa: object, length: int, payload: bytes | None, private: object
) -> dict[str, Any]:
    v = vm.vcpu(vcpu)
    g, _ = check_access_range(vm, gpa, length, PAGE_SIZE)
    _check_private_hint(vm, private, g)
    vm.check_table_budget(length)
    tdx_lifecycle.check_can_run(vm, v)
    v.running = True
    res = FaultPath(vm, v, "read" if payload is None else "write").run(g, length)
    if res.exit is not None:
        return {"exit": res.exit}
    out = bytearray()
    pos = g
    end = g + length
    while pos < end:
        n = min(end - pos, PAGE_SIZE - (pos & (PAGE_SIZE - 1)))
        src = _backing(vm, v, pos)
        if payload is None:
            out += src.read(n)
        else:
            src.write(payload[pos - g : pos - g + n])
        pos += n
    return {"data": out.hex()} if payload is None else {}


def _backing(vm: KvmState, vcpu: Vcpu, gpa: int) -> _Backing:
    """Where the SPTE for `gpa` points: a host page or a guest_memfd page."""
    pos = A.gpa_to_gfn(gpa)
    gfn = pos & ~vm.gfn_direct_bits
    private = vm.is_tdx and not pos & vm.gfn_direct_bits
    root = vm.root_for(vcpu, RootRole.MIRROR if private else RootRole.DIRECT)
    _t, _i, level, e = vm.mmu.lookup(root, pos)
    assert e & S.SPTE_MMU_PRESENT, "the fault path left the page unmapped"
    pfn = S.pfn_of(e) + (pos & (span(level) - 1))
    off = gpa & (PAGE_SIZE - 1)
    owner = vm.gmem.pfn_owner(pfn)
    if owner is not None:
        return _Backing(vm, owner[0], owner[1], off)
    del gfn
    return _Backing(vm, None, pfn, off)


def _bool_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) runs of True in a bool array."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


class _Backing:
    """A page as the CPU reaches it through an SPTE."""

    def __init__(self, vm: KvmState, file: GmemFile | None, page: int, off: int) -> None:
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
