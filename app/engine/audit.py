"""Invariants every VM state must satisfy (kvm-private-tdx.md §7). Reports, never raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import spte as S
from .addr import hva_to_pfn
from .paging import ENTRIES, span
from .roots import Root, RootRole
from .uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

if TYPE_CHECKING:
    from .vm import Vm

MAX_VIOLATIONS = 100


def audit(vm: Vm) -> dict[str, Any]:
    out: list[dict[str, Any]] = []

    def bad(rule: str, detail: str, **kw: object) -> None:
        if len(out) < MAX_VIOLATIONS:
            out.append({"rule": rule, "detail": detail, **kw})

    mmu, pool = vm.mmu, vm.mmu.pool
    counted = [0, 0, 0, 0]
    reachable: set[int] = set()
    for root in mmu.roots_of():
        per_root = [0, 0, 0, 0]
        gmem_leaves = 0
        if root.role is RootRole.MIRROR and not root.valid and vm.tdx and vm.tdx.hkid_assigned:
            bad("mirror_root_valid", "the mirror root of a live TD was invalidated", root=root.id)
        stack = [root.table]
        while stack:
            t = stack.pop()
            if not pool.is_live(t):
                bad("nonleaf_points_to_live_table", f"table {t} is not live", root=root.id)
                continue
            if t in reachable:
                bad("table_shared", f"table {t} reachable twice", root=root.id)
                continue
            reachable.add(t)
            level = pool.level(t)
            ent = pool.entries(t)
            present = (ent & S.U_PRESENT) != 0
            nonpresent_bad = ~present & (ent != S.NONPRESENT)
            # Non-present entries are the non-present value or an MMIO SPTE (rule 1).
            if nonpresent_bad.any():
                vals = ent[nonpresent_bad]
                mmio_ok = np.array([_mmio_ok(vm, root.role, int(v)) for v in vals[:64]])
                if not mmio_ok.all():
                    bad(
                        "nonpresent_value",
                        "a non-present entry is neither 0x8000… nor MMIO",
                        table=t,
                        root=root.id,
                    )
            leaf = present if level == 1 else present & ((ent & S.U_PS) != 0)
            if level > 3 and leaf.any():
                bad("leaf_level", f"a leaf at level {level}", table=t, root=root.id)
            nl = np.flatnonzero(present & ~leaf)
            for j in nl:
                child = pool.child(int(ent[j]))
                if not pool.is_live(child) or pool.level(child) != level - 1:
                    bad(
                        "nonleaf_points_to_live_table",
                        f"entry {j} of table {t} points to a dead or misleveled table",
                        root=root.id,
                    )
                    continue
                stack.append(child)
            idx = np.flatnonzero(leaf)
            if not len(idx):
                continue
            per_root[level] += len(idx)
            if level == 1 and mmu.count_gmem:
                pfns = (ent[idx] & S.U_ADDR) >> S.U_SHIFT
                gmem_leaves += int(np.count_nonzero(pfns >= np.uint64(S.GMEM_PFN_BASE)))
            _check_leaves(vm, root, t, level, idx, ent, bad)
        if mmu.count_gmem and gmem_leaves != root.gmem_leaves:
            bad(
                "stats_match_leaves",
                f"root {root.id} counts {root.gmem_leaves} private "
                f"leaves, tables hold {gmem_leaves}",
            )
        for lv in (1, 2, 3):
            counted[lv] += per_root[lv]
            if per_root[lv] != root.leaves[lv]:
                bad(
                    "root_counts",
                    f"root {root.id} counts {root.leaves[lv]} level-{lv} "
                    f"leaves, tables hold {per_root[lv]}",
                )
    for lv, name in ((1, "pages_4k"), (2, "pages_2m"), (3, "pages_1g")):
        if counted[lv] != mmu.pages[lv]:
            bad("stats_match_leaves", f"{name}={mmu.pages[lv]} but {counted[lv]} leaves exist")
    if len(reachable) != pool.live:
        bad("no_leaked_tables", f"{pool.live} live tables, {len(reachable)} reachable")
    if vm.tdx is not None and vm.tdx.blocked.total():
        bad("sept_blocked", "S-EPT pages left BLOCKED after an operation")
    for space in vm.spaces:
        for slot in space:
            if slot.invalid:
                bad("slot_invalid", f"slot {slot.slot:#x} left INVALID")
    return {
        "ok": not out,
        "violations": out,
        "checked": {
            "tables": len(reachable),
            "leaves": {"4k": counted[1], "2m": counted[2], "1g": counted[3]},
        },
    }


def _mmio_ok(vm: Vm, role: RootRole, v: int) -> bool:
    if role is RootRole.MIRROR:
        return False
    if vm.is_tdx:
        return not v & (S.EPT_R | S.EPT_W | S.EPT_X | S.SUPPRESS_VE)
    return S.is_mmio(v)


def _check_leaves(
    vm: Vm,
    root: Root,
    t: int,
    level: int,
    idx: np.ndarray,
    ent: np.ndarray,
    bad: Callable[..., None],
) -> None:
    """Placement, backing and permission rules for the leaves of one table (vectorised)."""
    pool = vm.mmu.pool
    sp = span(level)
    base = pool.gfn(t)
    vals = ent[idx]
    pos = base + idx.astype(np.int64) * sp
    pfns = ((vals & S.U_ADDR) >> S.U_SHIFT).astype(np.int64)
    if level > 1 and (pfns & (sp - 1)).any():
        bad("huge_pfn_aligned", f"a level-{level} leaf maps an unaligned pfn", table=t)
    w = (vals & S.U_W) != 0
    mmuw = (vals & S.U_MMU_WRITABLE) != 0
    hostw = (vals & np.uint64(S.EPT_HOST_WRITABLE)) != 0
    if (w & ~mmuw).any() or (mmuw & ~hostw).any():
        bad(
            "writable_chain",
            "W without MMU-writable or MMU-writable without host-writable",
            table=t,
        )
    bits = vm.gfn_direct_bits
    mirror = root.role is RootRole.MIRROR
    if bits:
        has = (pos & bits) != 0
        if mirror and has.any():
            bad("tdx_placement", "a mirror leaf at a shared-bit position", table=t)
        if not mirror and (~has).any():
            bad("tdx_placement", "a direct-root leaf without the shared bit", table=t)
    gfns = pos & ~bits
    # Group leaves by memslot with one bisect per run of the table.
    space = vm.spaces[root.as_id]
    k = 0
    n = len(gfns)
    while k < n:
        g = int(gfns[k])
        slot = space.find(g)
        if slot is None:
            bad(
                "leaf_in_live_memslot",
                f"gfn {g:#x} is mapped but no memslot holds it",
                root=root.id,
                gfn=g,
            )
            if _page_freed(vm, int(pfns[k]), sp):
                bad(
                    "no_freed_page_mapped",
                    "a leaf maps a page the host freed (use-after-free)",
                    root=root.id,
                    gfn=g,
                    pfn=int(pfns[k]),
                )
            k += 1
            continue
        m = k
        while m < n and int(gfns[m]) < slot.end_gfn:
            m += 1
        sl_g, sl_p = gfns[k:m], pfns[k:m]
        if int(sl_g[-1]) + sp > slot.end_gfn or int(sl_g[0]) < slot.base_gfn:
            bad("leaf_in_live_memslot", "a huge leaf extends beyond its memslot", gfn=g)
        # With KVM_DIRTY_LOG_INITIALLY_SET huge leaves stay until KVM_CLEAR_DIRTY_LOG splits them.
        # A split stopped by the table budget leaves huge leaves behind, write-protected: a
        # write faults at 4K (the fast path never restores W on a huge leaf while logging).
        if (
            level > 1
            and slot.flags & KVM_MEM_LOG_DIRTY_PAGES
            and not slot.flags & KVM_MEM_READONLY  # never dirtied: its huge leaves stay
            and (slot.as_id, slot.id) not in vm.dirty_initially_set
            and w[k:m].any()
        ):
            bad("no_huge_while_logging", "a writable huge leaf in a dirty-logging slot", gfn=g)
        if slot.flags & KVM_MEM_READONLY and (w[k:m] | hostw[k:m]).any():
            bad("readonly_slot", "a writable leaf in a READONLY slot", gfn=g)
        gmem_pfn = sl_p >= S.GMEM_PFN_BASE
        if mirror and not gmem_pfn.all():
            bad("mirror_maps_gmem", "a mirror leaf maps a non-guest_memfd pfn", gfn=g)
        # Private (gmem) pfns: the right file page, still allocated (rule 8, 16).
        gi = np.flatnonzero(gmem_pfn)
        if len(gi):
            file = vm.gmem.lookup(slot.guest_memfd)
            want = None
            if file is not None:
                want = file.base_pfn + (sl_g[gi] - slot.base_gfn + slot.gmem_pgoff)
            if file is None or want is None or not np.array_equal(want, sl_p[gi]):
                owner = vm.gmem.pfn_owner(int(sl_p[gi[0]]))
                freed = (
                    owner is None or owner[0].closed or not owner[0].is_allocated(owner[1], 1)[0]
                )
                bad(
                    "no_freed_page_mapped" if freed else "gmem_pfn_matches_binding",
                    "a private leaf maps a guest_memfd page that is not this slot's"
                    + (" and is FREED (use-after-free)" if freed else ""),
                    gfn=int(sl_g[gi[0]]),
                )
            else:
                assert want is not None
                alloc = file.is_allocated(int(want[0] - file.base_pfn), int(want[-1] - want[0]) + 1)
                rel = (want - want[0]).astype(np.int64)
                if file.closed or not alloc[rel].all():
                    bad(
                        "no_freed_page_mapped",
                        "a leaf maps a guest_memfd page that was freed (use-after-free)",
                        gfn=int(sl_g[gi[0]]),
                    )
            if vm.has_private_mem and not slot.gmem_only:
                priv = vm.attrs.private_mask(int(sl_g[gi[0]]), int(sl_g[gi[-1]]) + 1)
                rel = (sl_g[gi] - sl_g[gi[0]]).astype(np.int64)
                if not priv[rel].all():
                    bad(
                        "private_leaf_attribute",
                        "a private leaf on a SHARED gfn",
                        gfn=int(sl_g[gi[0]]),
                    )
        hi = np.flatnonzero(~gmem_pfn)
        if len(hi):
            hva_pfn = hva_to_pfn(slot.userspace_addr) + (sl_g[hi] - slot.base_gfn)
            if not np.array_equal(hva_pfn, sl_p[hi]):
                bad(
                    "shared_pfn_matches_hva",
                    "a shared leaf maps another host page",
                    gfn=int(sl_g[hi[0]]),
                )
            lo_p, hi_p = int(sl_p[hi].min()), int(sl_p[hi].max()) + sp
            if len(vm.host.freed) and vm.host.freed.overlap(lo_p, hi_p):
                for j in hi[:ENTRIES]:
                    p = int(sl_p[j])
                    if vm.host.freed.overlap(p, p + sp):
                        bad(
                            "no_freed_page_mapped",
                            "a leaf maps a discarded host page",
                            gfn=int(sl_g[j]),
                        )
                        break
            if (
                vm.has_private_mem
                and not mirror
                and vm.attrs.private.overlap(int(sl_g[hi[0]]), int(sl_g[hi[-1]]) + sp)
            ):
                if level > 1:
                    # A huge leaf must not cover a PRIVATE gfn anywhere in its span.
                    hit = any(vm.attrs.private.overlap(int(g), int(g) + sp) for g in sl_g[hi])
                else:
                    priv = vm.attrs.private_mask(int(sl_g[hi[0]]), int(sl_g[hi[-1]]) + 1)
                    hit = bool(priv[(sl_g[hi] - sl_g[hi[0]]).astype(np.int64)].any())
                if hit:
                    bad(
                        "shared_leaf_attribute",
                        "a shared leaf on a PRIVATE gfn",
                        gfn=int(sl_g[hi[0]]),
                    )
        k = m


def _page_freed(vm: Vm, pfn: int, npages: int) -> bool:
    """Whether the host page(s) behind `pfn` are back with the host allocator."""
    if pfn >= S.GMEM_PFN_BASE:
        owner = vm.gmem.pfn_owner(pfn)
        return owner is None or owner[0].closed or not owner[0].is_allocated(owner[1], 1)[0]
    return bool(len(vm.host.freed)) and vm.host.freed.overlap(pfn, pfn + npages) > 0
