"""A TD's lifecycle: the KVM_TDX_* commands of KVM_MEMORY_ENCRYPT_OP and their rules.

A TD goes uninitialized → initialized (KVM_TDX_INIT_VM) → runnable (KVM_TDX_FINALIZE_VM).
Between the two its vCPUs are created and initialised (KVM_TDX_INIT_VCPU) and the initial
private image is added with KVM_TDX_INIT_MEM_REGION (TDH.MEM.PAGE.ADD, optionally measured
with TDH.MR.EXTEND). Only a runnable TD's initialised vCPUs run; KVM_PRE_FAULT_MEMORY waits
for finalize too. Checks follow arch/x86/kvm/vmx/tdx.c (tdx_td_init, tdx_vcpu_create,
tdx_vcpu_ioctl, tdx_vcpu_init, tdx_vcpu_init_mem_region, tdx_td_finalize, tdx_vcpu_pre_run)
in their order; see docs/engine.md "TD lifecycle".

A TD created without the lifecycle (`td_lifecycle=False`, every TD journaled before it
existed) is runnable from creation, as it always was.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from . import addr as A
from .errors import KvmError, check_u64, einval
from .faults import FaultPath
from .op import Op, operation
from .tdx import TDX_TD_ATTR_SEPT_VE_DISABLE, TdxState
from .uapi import PAGE_SIZE

if TYPE_CHECKING:
    from .state import KvmState
    from .vcpu import Vcpu

KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0
# Pages one INIT_MEM_REGION call may add (the kernel loops with cond_resched; vkmmu bounds a
# journal record's work instead).
MAX_INIT_MEM_PAGES = 1 << 18


@operation("tdx_init_vm")
class TdxInitVm(Op):
    """KVM_TDX_INIT_VM: TD attributes, and the guest physical address width that CPUID
    0x8000_0008 EAX[23:16] carries (48 or 52)."""

    attributes: int = 0
    gpaw: int | None = None
    flags: int = 0


@operation("tdx_init_vcpu")
class TdxInitVcpu(Op):
    """KVM_TDX_INIT_VCPU (`rcx`: the value the TD's vCPU starts with in RCX)."""

    vcpu: int
    rcx: int = 0
    flags: int = 0


@operation("tdx_init_mem_region")
class TdxInitMemRegion(Op):
    """KVM_TDX_INIT_MEM_REGION: copy `nr_pages` pages from `source_addr` (host memory) into
    private memory at `gpa`; flags KVM_TDX_MEASURE_MEMORY_REGION measures them."""

    vcpu: int
    source_addr: int
    gpa: int
    nr_pages: int
    flags: int = 0


@operation("tdx_finalize_vm")
class TdxFinalizeVm(Op):
    """KVM_TDX_FINALIZE_VM (TDH.MR.FINALIZE): the TD becomes runnable."""


def _td(vm: KvmState) -> TdxState:
    """vt_mem_enc_ioctl: KVM_MEMORY_ENCRYPT_OP on a VM that is not a TD is ENOTTY."""
    if vm.tdx is None:
        raise KvmError(errno.ENOTTY, "KVM_MEMORY_ENCRYPT_OP: not a TD (KVM_X86_TDX_VM)")
    return vm.tdx


def init_vm(vm: KvmState, op: TdxInitVm) -> dict[str, Any]:
    """tdx_td_init, then setup_tdparams / setup_tdparams_eptp_controls, in order."""
    td = _td(vm)
    attributes, flags = check_u64(op.attributes, "attributes"), check_u64(op.flags, "flags")
    if td.td_state != "uninitialized":
        raise einval("KVM_TDX_INIT_VM: the TD is already initialised")
    if flags:
        raise einval("KVM_TDX_INIT_VM: flags must be 0")
    if vm.vcpus:
        raise KvmError(errno.EBUSY, "KVM_TDX_INIT_VM after KVM_CREATE_VCPU (created_vcpus)")
    if attributes & ~TDX_TD_ATTR_SEPT_VE_DISABLE:
        raise einval("KVM_TDX_INIT_VM: TD attributes beyond SEPT_VE_DISABLE (bit 28)")
    gpaw = 48 if vm.paging_levels == 4 else 52
    if op.gpaw is not None:
        if check_u64(op.gpaw, "gpaw") not in (48, 52):
            raise einval("KVM_TDX_INIT_VM: GPAW (CPUID 0x80000008 EAX[23:16]) must be 48 or 52")
        if op.gpaw != gpaw:
            # The kernel derives the shared bit from GPAW here and KVM_BUG_ONs when it
            # disagrees with the EPT level of the first vCPU entry; vkmmu fixes the EPT level
            # at creation and refuses a GPAW that contradicts it.
            raise einval(
                f"KVM_TDX_INIT_VM: GPAW {op.gpaw} needs a {4 if op.gpaw == 48 else 5}-level EPT"
            )
    for name in ("TDH.MNG.CREATE", "TDH.MNG.KEY.CONFIG", "TDH.MNG.INIT"):
        td.lifecycle_op(name)
    td.hkid_assigned = True
    td.attributes, td.gpaw = attributes, gpaw
    td.td_state = "initialized"
    return td.lifecycle_dict()


def _vcpu_cmd(vm: KvmState, vcpu: object, flags: object) -> tuple[TdxState, Vcpu, int]:
    """tdx_vcpu_ioctl: a TD vCPU command needs an initialised, not yet finalised TD. That is
    checked before the vCPU is looked up: before INIT_VM (and after FINALIZE_VM) no vCPU of a
    lifecycle TD can exist (tdx_vcpu_create), so the TD's state is the answer, EINVAL."""
    if vm.tdx is None:
        raise einval("KVM_MEMORY_ENCRYPT_OP on a vCPU that is not a TD's (vt_vcpu_mem_enc_ioctl)")
    td = vm.tdx
    if not td.hkid_assigned or td.runnable:
        raise einval(f"TD vCPU commands need an initialised TD, not finalised (TD {td.td_state})")
    v = vm.vcpu(vcpu)
    return td, v, check_u64(flags, "flags")


def init_vcpu(vm: KvmState, op: TdxInitVcpu) -> dict[str, Any]:
    """tdx_vcpu_init: flags 0, once per vCPU; TDH.VP.CREATE / TDH.VP.INIT."""
    td, v, flags = _vcpu_cmd(vm, op.vcpu, op.flags)
    check_u64(op.rcx, "rcx")
    if flags:
        raise einval("KVM_TDX_INIT_VCPU: flags must be 0")
    if td.vcpu_initialized(v.id):
        raise einval(f"KVM_TDX_INIT_VCPU: vCPU {v.id} is already initialised")
    td.lifecycle_op("TDH.VP.CREATE")
    td.lifecycle_op("TDH.VP.INIT")
    assert td.init_vcpus is not None
    td.init_vcpus.add(v.id)
    return td.lifecycle_dict()


def init_mem_region(vm: KvmState, op: TdxInitMemRegion) -> dict[str, Any]:
    """tdx_vcpu_init_mem_region; per page kvm_gmem_populate + tdx_gmem_post_populate.

    Pages are added one by one as in the kernel: a failure after the first page leaves the
    earlier ones added (the error says the state changed) and the answer of a success is the
    region struct as the kernel writes it back (nr_pages 0)."""
    td, v, flags = _vcpu_cmd(vm, op.vcpu, op.flags)
    if not td.vcpu_initialized(v.id):
        raise einval(f"KVM_TDX_INIT_MEM_REGION: vCPU {v.id} is not initialised")
    if flags & ~KVM_TDX_MEASURE_MEMORY_REGION:
        raise einval("KVM_TDX_INIT_MEM_REGION: only KVM_TDX_MEASURE_MEMORY_REGION is a flag")
    src, gpa = check_u64(op.source_addr, "source_addr"), check_u64(op.gpa, "gpa")
    n = check_u64(op.nr_pages, "nr_pages")
    end = gpa + n * PAGE_SIZE
    bits = vm.gfn_direct_bits
    if (
        src & (PAGE_SIZE - 1)
        or gpa & (PAGE_SIZE - 1)
        or not n
        or end >= 1 << 64
        or A.is_shared(A.gpa_to_gfn(gpa), bits)
        or A.is_shared(A.gpa_to_gfn(end - 1), bits)
    ):
        raise einval("source_addr/gpa page aligned, nr_pages > 0, a private range, no wrap")
    if n > MAX_INIT_MEM_PAGES:
        raise KvmError(errno.E2BIG, f"one call adds at most {MAX_INIT_MEM_PAGES} pages")
    if end > vm.gpa_limit:
        raise einval("range beyond the guest physical address space")
    vm.check_table_budget(n * PAGE_SIZE)
    done = 0
    try:
        for i in range(n):
            _add_page(vm, td, v, A.gpa_to_gfn(gpa) + i, src + i * PAGE_SIZE, bool(flags))
            done += 1
    except KvmError as e:
        e.state_changed = done > 0
        raise
    return {"source_addr": src + n * PAGE_SIZE, "gpa": end, "nr_pages": 0}


def _add_page(vm: KvmState, td: TdxState, v: Vcpu, gfn: int, src: int, measure: bool) -> None:
    """kvm_gmem_populate for one page (slot bound to guest_memfd: EINVAL; file gone: EFAULT;
    attribute not PRIVATE: EINVAL; page already prepared: EEXIST), the source page (EFAULT
    when get_user_pages_fast cannot reach it), kvm_tdp_map_page, TDH.MEM.PAGE.ADD."""
    slot = vm.spaces[0].find(gfn)
    if slot is None or slot.guest_memfd is None:
        raise einval(f"gfn {gfn:#x}: no memslot bound to a guest_memfd (kvm_gmem_populate)")
    file = vm.gmem.lookup(slot.guest_memfd)
    if file is None or file.closed:
        raise KvmError(errno.EFAULT, f"gfn {gfn:#x}: the slot's guest_memfd is gone")
    if vm.attrs.get(gfn) == 0:
        raise einval(f"gfn {gfn:#x} is not PRIVATE (kvm_gmem_populate)")
    if vm.private_mapped(v, gfn):
        raise KvmError(errno.EEXIST, f"gfn {gfn:#x}: the guest_memfd page is already prepared")
    if src + PAGE_SIZE > vm.user_addr_end:
        raise KvmError(errno.EFAULT, f"source {src:#x} is outside the user address space")
    map_private_page(vm, v, gfn)  # kvm_tdp_map_page: SEPT.ADD as needed, premapped += 1
    data = vm.host.read(src, PAGE_SIZE)
    if any(data):
        file.write(A.page_to_offset(slot.gmem_index(gfn)), data)
    td.page_add(gfn, measure)


def finalize_vm(vm: KvmState, op: TdxFinalizeVm) -> dict[str, Any]:
    """tdx_td_finalize: an initialised TD, not yet finalised, nothing premapped; then
    TDH.MR.FINALIZE and pre_fault_allowed."""
    td = _td(vm)
    if not td.hkid_assigned or td.runnable:
        raise einval("KVM_TDX_FINALIZE_VM needs an initialised TD that is not finalised yet")
    if td.premapped:
        raise einval("KVM_TDX_FINALIZE_VM: pages mapped but not added (nr_premapped)")
    td.lifecycle_op("TDH.MR.FINALIZE")
    td.td_state = "runnable"
    return td.lifecycle_dict()


def check_can_run(vm: KvmState, v: Vcpu) -> None:
    """tdx_vcpu_pre_run: KVM_RUN of a TD vCPU needs the vCPU initialised and the TD runnable."""
    td = vm.tdx
    if td is not None and (not td.runnable or not td.vcpu_initialized(v.id)):
        raise einval(
            f"KVM_RUN: TD is {td.td_state}, vCPU {v.id} "
            f"{'is' if td.vcpu_initialized(v.id) else 'is not'} initialised (tdx_vcpu_pre_run)"
        )


def check_can_create_vcpu(vm: KvmState) -> None:
    """tdx_vcpu_create: vCPUs of a lifecycle TD exist only between INIT_VM and FINALIZE_VM."""
    td = vm.tdx
    if td is not None and td.lifecycle and td.td_state != "initialized":
        raise KvmError(errno.EIO, f"KVM_CREATE_VCPU on a TD that is {td.td_state}")


def map_private_page(vm: KvmState, vcpu: Vcpu, gfn: int) -> None:
    """kvm_tdp_map_page of one private GFN (a prefetch: no guest access)."""
    res = FaultPath(vm, vcpu, "write", prefetch=True).run(A.gfn_to_gpa(gfn), PAGE_SIZE)
    assert res.exit is None, f"populate of gfn {gfn:#x} exited: {res.exit}"
