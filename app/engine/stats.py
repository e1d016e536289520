"""VM statistics: the kernel's binary-stats names (kvm-memslots.md §7) plus vkmmu's counters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .roots import RootRole

if TYPE_CHECKING:
    from .state import KvmState

# The kernel's x86 VM stats in descriptor order, split by binary-stats type.
KVM_CUMULATIVE_STATS = (
    "remote_tlb_flush",
    "remote_tlb_flush_requests",
    "mmu_shadow_zapped",
    "mmu_pte_write",
    "mmu_pde_zapped",
    "mmu_flooded",
    "mmu_recycled",
    "mmu_cache_miss",
)
KVM_STAT_NAMES = KVM_CUMULATIVE_STATS + (
    "mmu_unsync",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "nx_lpage_splits",
    "max_mmu_rmap_size",
    "max_mmu_page_hash_collisions",
)
VCPU_STAT_NAMES = (
    "pf_taken",
    "pf_fixed",
    "pf_fast",
    "pf_spurious",
    "pf_mmio_spte_created",
    "pf_emulate",
    "root_reloads",
)


# Cumulative stats (the kernel's binary-stats type CUMULATIVE, and vkmmu's own event counts);
# the kernel's INSTANT and PEAK stats (pages_*, mmu_unsync, nx_lpage_splits, max_*) and views
# of present state (page_tables, roots, *_pages_*, zapped_not_refaulted, …) are not.
_CUMULATIVE = frozenset(KVM_CUMULATIVE_STATS) | frozenset(
    {
        "refaults",
        "mmio_sptes",
        "memslot_generation_wraps",
        "root_reloads",
        "tdx_reaccepts",
        "pml_entries",
        "pml_full_exits",
    }
)
_CUMULATIVE_PREFIXES = ("zaps_", "pf_", "tdx_")
_PRESENT_STATE = frozenset({"tdx_accepted_pages"})


def is_cumulative(name: str) -> bool:
    """Whether a stat only ever grows (a Prometheus counter) rather than describing state."""
    if name in _PRESENT_STATE:
        return False
    return name in _CUMULATIVE or name.startswith(_CUMULATIVE_PREFIXES)


def stats_view(vm: KvmState) -> dict[str, Any]:
    """The binary-stats names of the kernel first, then vkmmu's own counters."""
    out: dict[str, Any] = dict(vm.stats_kvm)
    out["pages_4k"], out["pages_2m"], out["pages_1g"] = vm.mmu.pages[1:4]
    out.update(vm.stats_extra)
    out["page_tables"] = vm.mmu.pool.live
    out["roots"] = len(vm.mmu.roots)
    by_role = {"shared": [0, 0, 0, 0], "private": [0, 0, 0, 0]}
    for r in vm.mmu.roots.values():
        key = "private" if r.role is RootRole.MIRROR else "shared"
        by_role[key] = [a + b for a, b in zip(by_role[key], r.leaves, strict=True)]
    if vm.has_private_mem and not vm.is_tdx:
        # One root holds both views: guest_memfd pfns are the private leaves (all 4K).
        priv = sum(r.gmem_leaves for r in vm.mmu.roots.values())
        by_role["private"][1] += priv
        by_role["shared"][1] -= priv
    for key, v in by_role.items():
        out[f"{key}_pages_4k"], out[f"{key}_pages_2m"], out[f"{key}_pages_1g"] = v[1:4]
    out["zapped_not_refaulted"] = vm.zapped.total()
    for name in VCPU_STAT_NAMES:
        out[name] = sum(v.stats[name] for v in vm.vcpus.values())
    if vm.tdx is not None:
        t = vm.tdx.to_dict()
        for op, n in t["ops"].items():  # type: ignore[attr-defined]
            out["tdx_" + op.lower().replace(".", "_")] = n
        out["tdx_reaccepts"] = vm.tdx.reaccepts
        out["tdx_accepted_pages"] = vm.tdx.accepted.total()
    return out
