"""VM statistics: the kernel's binary-stats names (kvm-memslots.md §7) plus vkmmu's counters,
and which of them are cumulative. The stats view itself is `views.stats`."""

from __future__ import annotations

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
