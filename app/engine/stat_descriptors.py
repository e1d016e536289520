"""What every stat of `views.stats` means, in the shape of the kernel's binary-stats descriptors.

KVM describes each stat it exports through `KVM_GET_STATS_FD` with a `struct kvm_stats_desc`
(include/uapi/linux/kvm.h): a name, a type (`KVM_STATS_TYPE_CUMULATIVE`, `_INSTANT`, `_PEAK`)
and a unit (`KVM_STATS_UNIT_NONE`, `_BYTES`, `_SECONDS`, `_CYCLES`, `_BOOLEAN`). The x86 VM
stats are declared in arch/x86/kvm/x86.c `kvm_vm_stats_desc` (with `KVM_GENERIC_VM_STATS()`
from include/linux/kvm_host.h): `STATS_DESC_COUNTER` is cumulative, `STATS_DESC_ICOUNTER`
instant and `STATS_DESC_PCOUNTER` peak. The vCPU page-fault counters come from
`kvm_vcpu_stats_desc` (all `STATS_DESC_COUNTER`), summed over the VM's vCPUs here.
vkmmu's own stats use the same three kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .stats import KVM_CUMULATIVE_STATS, KVM_STAT_NAMES, VCPU_STAT_NAMES
from .tdx import OPS as TDX_OPS

Kind = Literal["cumulative", "instant", "peak"]
Source = Literal["kvm_vm", "kvm_vcpu", "vkmmu"]


@dataclass(frozen=True, slots=True)
class StatDescriptor:
    name: str
    kind: Kind
    unit: Literal["none", "bytes", "seconds", "cycles", "boolean"]
    source: Source  # the kernel's VM stats, its vCPU stats (summed), or vkmmu's own
    description: str
    tdx_only: bool = False


def _d(
    name: str, kind: Kind, source: Source, description: str, tdx: bool = False
) -> StatDescriptor:
    return StatDescriptor(name, kind, "none", source, description, tdx)


_KVM_PEAK = ("max_mmu_rmap_size", "max_mmu_page_hash_collisions")

_KVM_TEXT = {
    "remote_tlb_flush": "Remote TLB flushes that sent an IPI (a vCPU was in the guest).",
    "remote_tlb_flush_requests": "kvm_flush_remote_tlbs() calls, IPI or not.",
    "mmu_shadow_zapped": "Shadow pages zapped (shadow MMU only; 0 with the TDP MMU).",
    "mmu_pte_write": "Guest writes to shadowed page tables (shadow MMU only).",
    "mmu_pde_zapped": "Shadow PDEs zapped on a guest write (shadow MMU only).",
    "mmu_flooded": "Shadow pages unsynced by write flooding (shadow MMU only).",
    "mmu_recycled": "Shadow pages recycled to stay under the limit (shadow MMU only).",
    "mmu_cache_miss": "Shadow page lookups that missed (shadow MMU only).",
    "mmu_unsync": "Unsync shadow pages now (shadow MMU only).",
    "pages_4k": "Leaf SPTEs mapping 4 KiB now, every root.",
    "pages_2m": "Leaf SPTEs mapping 2 MiB now, every root.",
    "pages_1g": "Leaf SPTEs mapping 1 GiB now, every root.",
    "nx_lpage_splits": "Possible NX huge pages now: 4K tables exec faults built where a huge "
    "page was possible (host.nx_huge_pages).",
    "max_mmu_rmap_size": "Largest rmap chain seen (shadow MMU only).",
    "max_mmu_page_hash_collisions": "Most shadow-page hash collisions seen (shadow MMU only).",
}

_VCPU_TEXT = {
    "pf_taken": "Page faults that reached the KVM fault handler.",
    "pf_fixed": "Page faults fixed by installing an SPTE.",
    "pf_fast": "Page faults fixed on the fast path (e.g. a write-protected dirty-log page).",
    "pf_spurious": "Page faults that found the SPTE already fixed.",
    "pf_mmio_spte_created": "MMIO SPTEs installed by a fault.",
    "pf_emulate": "Page faults that needed instruction emulation (MMIO).",
    "root_reloads": "vCPU root loads after their root became obsolete (vkmmu's count).",
}

_VKMMU: tuple[StatDescriptor, ...] = (
    _d("refaults", "cumulative", "vkmmu", "Faults on a GFN that a zap had emptied."),
    _d("zaps_all_fast", "cumulative", "vkmmu", "kvm_mmu_zap_all_fast runs."),
    _d("zaps_slot_leafs", "cumulative", "vkmmu", "Memslot zaps of only the slot's leaf SPTEs."),
    _d("zaps_range", "cumulative", "vkmmu", "Explicit GFN-range zaps."),
    _d("zaps_notifier", "cumulative", "vkmmu", "MMU-notifier invalidations that zapped."),
    _d("zaps_total_sptes", "cumulative", "vkmmu", "Leaf SPTEs zapped by every zap."),
    _d("mmio_sptes", "cumulative", "vkmmu", "MMIO SPTEs installed."),
    _d(
        "memslot_generation_wraps",
        "cumulative",
        "vkmmu",
        "MMIO generation wraps (each one a fast zap).",
    ),
    _d("page_tables", "instant", "vkmmu", "Page-table pages (4 KiB each) allocated now."),
    _d("roots", "instant", "vkmmu", "TDP roots now, valid or not."),
    _d("shared_pages_4k", "instant", "vkmmu", "Shared (direct-root) leaves mapping 4 KiB now."),
    _d("shared_pages_2m", "instant", "vkmmu", "Shared (direct-root) leaves mapping 2 MiB now."),
    _d("shared_pages_1g", "instant", "vkmmu", "Shared (direct-root) leaves mapping 1 GiB now."),
    _d("private_pages_4k", "instant", "vkmmu", "Private leaves mapping 4 KiB now."),
    _d("private_pages_2m", "instant", "vkmmu", "Private leaves mapping 2 MiB now."),
    _d("private_pages_1g", "instant", "vkmmu", "Private leaves mapping 1 GiB now."),
    _d("zapped_not_refaulted", "instant", "vkmmu", "Zapped GFNs not faulted in again yet."),
    _d("pml_entries", "cumulative", "vkmmu", "GPAs logged in PML buffers (host.enable_pml)."),
    _d("pml_full_exits", "cumulative", "vkmmu", "PML-full VM exits (one per 512 entries)."),
)


def tdx_op_stat(op: str) -> str:
    """The stat name of a TDX module operation: `TDH.MEM.PAGE.AUG` → `tdx_tdh_mem_page_aug`."""
    return "tdx_" + op.lower().replace(".", "_")


_TDX: tuple[StatDescriptor, ...] = (
    *(
        _d(tdx_op_stat(op), "cumulative", "vkmmu", f"{op} operations on this TD.", tdx=True)
        for op in TDX_OPS
    ),
    _d("tdx_reaccepts", "cumulative", "vkmmu", "Pages the TD accepted again after a zap.", True),
    _d("tdx_accepted_pages", "instant", "vkmmu", "Pages the TD has accepted now.", True),
)


def _kvm_kind(name: str) -> Kind:
    if name in KVM_CUMULATIVE_STATS:
        return "cumulative"
    return "peak" if name in _KVM_PEAK else "instant"


DESCRIPTORS: tuple[StatDescriptor, ...] = (
    *(_d(n, _kvm_kind(n), "kvm_vm", _KVM_TEXT[n]) for n in KVM_STAT_NAMES),
    *_VKMMU,
    *(
        _d(n, "cumulative", "vkmmu" if n == "root_reloads" else "kvm_vcpu", _VCPU_TEXT[n])
        for n in VCPU_STAT_NAMES
    ),
    *_TDX,
)

BY_NAME: dict[str, StatDescriptor] = {d.name: d for d in DESCRIPTORS}
