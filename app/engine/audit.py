"""Invariants every VM state must satisfy (kvm-private-tdx.md §7). Reports, never raises."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import spte as S
from .addr import hva_to_pfn
from .paging import ENTRIES, span
from .roots import Root, RootRole
from .uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

if TYPE_CHECKING:
    from .memslots import Memslot
    from .state import KvmState

MAX_VIOLATIONS = 100


def audit(vm: KvmState) -> dict[str, Any]:
    return _Audit(vm).run()


class _Audit:
    """One pass over every root's tables, the violations found in the order met."""

    def __init__(self, vm: KvmState) -> None:
        self.vm = vm
        self.out: list[dict[str, Any]] = []
        self.counted = [0] * 6
        self.reachable: set[int] = set()

    def bad(self, rule: str, detail: str, **kw: object) -> None:
        if len(self.out) < MAX_VIOLATIONS:
            self.out.append({"rule": rule, "detail": detail, **kw})

    def run(self) -> dict[str, Any]:
        vm, mmu, bad = self.vm, self.vm.mmu, self.bad
        for root in mmu.roots_of():
            self.root(root)
        for lv, name in ((1, "pages_4k"), (2, "pages_2m"), (3, "pages_1g")):
            if self.counted[lv] != mmu.pages[lv]:
                bad(
                    "stats_match_leaves",
                    f"{name}={mmu.pages[lv]} but {self.counted[lv]} leaves exist",
                )
        if len(self.reachable) != mmu.pool.live:
            bad("no_leaked_tables", f"{mmu.pool.live} live tables, {len(self.reachable)} reachable")
        if vm.tdx is not None and vm.tdx.blocked.total():
            bad("sept_blocked", "S-EPT pages left BLOCKED after an operation")
        for space in vm.spaces:
            for slot in space:
                if slot.invalid:
                    bad("slot_invalid", f"slot {slot.slot:#x} left INVALID")
        c = self.counted
        return {
            "ok": not self.out,
            "violations": self.out,
            "checked": {
                "tables": len(self.reachable),
                "leaves": {"4k": c[1], "2m": c[2], "1g": c[3]},
            },
        }

    def root(self, root: Root) -> None:
        """Every table reachable from `root` once; its leaf counts against the root's."""
        vm, bad = self.vm, self.bad
        per_root = [0] * 6  # by level; a leaf above level 3 is counted too (and reported)
        gmem_leaves = 0
        if root.role is RootRole.MIRROR and not root.valid and vm.tdx and vm.tdx.hkid_assigned:
            bad("mirror_root_valid", "the mirror root of a live TD was invalidated", root=root.id)
        stack = [root.table]
        while stack:
            found = self.table(root, stack.pop(), stack)
            if found is not None:
                level, n, gmem = found
                per_root[level] += n
                gmem_leaves += gmem
        if vm.mmu.count_gmem and gmem_leaves != root.gmem_leaves:
            bad(
                "stats_match_leaves",
                f"root {root.id} counts {root.gmem_leaves} private "
                f"leaves, tables hold {gmem_leaves}",
            )
        for lv in (1, 2, 3):
            self.counted[lv] += per_root[lv]
            if per_root[lv] != root.leaves[lv]:
                bad(
                    "root_counts",
                    f"root {root.id} counts {root.leaves[lv]} level-{lv} "
                    f"leaves, tables hold {per_root[lv]}",
                )

    def table(self, root: Root, t: int, stack: list[int]) -> tuple[int, int, int] | None:
        """Check one table, push its children; (level, leaves, guest_memfd leaves)."""
        vm, pool, bad = self.vm, self.vm.mmu.pool, self.bad
        if not pool.is_live(t):
            bad("nonleaf_points_to_live_table", f"table {t} is not live", root=root.id)
            return None
        if t in self.reachable:
            bad("table_shared", f"table {t} reachable twice", root=root.id)
            return None
        self.reachable.add(t)
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
        for j in np.flatnonzero(present & ~leaf):
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
            return None
        gmem = 0
        if level == 1 and vm.mmu.count_gmem:
            pfns = (ent[idx] & S.U_ADDR) >> S.U_SHIFT
            gmem = int(np.count_nonzero(pfns >= np.uint64(S.GMEM_PFN_BASE)))
        _Leaves(self, root, t, level, ent[idx], idx).check()
        return level, len(idx), gmem


def _mmio_ok(vm: KvmState, role: RootRole, v: int) -> bool:
    if role is RootRole.MIRROR:
        return False
    if vm.is_tdx:
        return not v & (S.EPT_R | S.EPT_W | S.EPT_X | S.SUPPRESS_VE)
    return S.is_mmio(v)


class _Leaves:
    """Placement, backing and permission rules for the leaves of one table (vectorised),
    a run of leaves in one memslot at a time."""

    def __init__(
        self, audit: _Audit, root: Root, t: int, level: int, vals: np.ndarray, idx: np.ndarray
    ) -> None:
        self.vm, self.bad, self.root, self.t, self.level = audit.vm, audit.bad, root, t, level
        self.sp = span(level)
        self.vals = vals
        self.pos = audit.vm.mmu.pool.gfn(t) + idx.astype(np.int64) * self.sp
        self.pfns = ((vals & S.U_ADDR) >> S.U_SHIFT).astype(np.int64)
        self.w = (vals & S.U_W) != 0
        self.hostw = (vals & np.uint64(S.EPT_HOST_WRITABLE)) != 0
        self.mirror = root.role is RootRole.MIRROR

    def check(self) -> None:
        vm, bad, t, sp = self.vm, self.bad, self.t, self.sp
        if self.level > 1 and (self.pfns & (sp - 1)).any():
            bad("huge_pfn_aligned", f"a level-{self.level} leaf maps an unaligned pfn", table=t)
        mmuw = (self.vals & S.U_MMU_WRITABLE) != 0
        if (self.w & ~mmuw).any() or (mmuw & ~self.hostw).any():
            bad(
                "writable_chain",
                "W without MMU-writable or MMU-writable without host-writable",
                table=t,
            )
        bits = vm.gfn_direct_bits
        if bits:
            has = (self.pos & bits) != 0
            if self.mirror and has.any():
                bad("tdx_placement", "a mirror leaf at a shared-bit position", table=t)
            if not self.mirror and (~has).any():
                bad("tdx_placement", "a direct-root leaf without the shared bit", table=t)
        gfns = self.pos & ~bits
        # Group leaves by memslot with one bisect per run of the table.
        space = vm.spaces[self.root.as_id]
        k, n = 0, len(gfns)
        while k < n:
            g = int(gfns[k])
            slot = space.find(g)
            if slot is None:
                self.outside(g, int(self.pfns[k]))
                k += 1
                continue
            m = k
            while m < n and int(gfns[m]) < slot.end_gfn:
                m += 1
            self.slot_run(slot, gfns[k:m], self.pfns[k:m], k, m)
            k = m

    def outside(self, g: int, pfn: int) -> None:
        """A leaf no memslot holds, and whether it maps a freed page."""
        rid = self.root.id
        self.bad(
            "leaf_in_live_memslot", f"gfn {g:#x} is mapped but no memslot holds it", root=rid, gfn=g
        )
        if _page_freed(self.vm, pfn, self.sp):
            self.bad(
                "no_freed_page_mapped",
                "a leaf maps a page the host freed (use-after-free)",
                root=rid,
                gfn=g,
                pfn=pfn,
            )

    def slot_run(self, slot: Memslot, sl_g: np.ndarray, sl_p: np.ndarray, k: int, m: int) -> None:
        """Leaves k … m-1, all in `slot` (GFNs `sl_g`, pfns `sl_p`)."""
        vm, bad, g = self.vm, self.bad, int(sl_g[0])
        if int(sl_g[-1]) + self.sp > slot.end_gfn or int(sl_g[0]) < slot.base_gfn:
            bad("leaf_in_live_memslot", "a huge leaf extends beyond its memslot", gfn=g)
        # With KVM_DIRTY_LOG_INITIALLY_SET huge leaves stay until KVM_CLEAR_DIRTY_LOG splits them.
        # A split stopped by the table budget leaves huge leaves behind, write-protected: a
        # write faults at 4K (the fast path never restores W on a huge leaf while logging).
        if (
            self.level > 1
            and slot.flags & KVM_MEM_LOG_DIRTY_PAGES
            and not slot.flags & KVM_MEM_READONLY  # never dirtied: its huge leaves stay
            and (slot.as_id, slot.id) not in vm.dirty_initially_set
            and self.w[k:m].any()
        ):
            bad("no_huge_while_logging", "a writable huge leaf in a dirty-logging slot", gfn=g)
        if slot.flags & KVM_MEM_READONLY and (self.w[k:m] | self.hostw[k:m]).any():
            bad("readonly_slot", "a writable leaf in a READONLY slot", gfn=g)
        gmem_pfn = sl_p >= S.GMEM_PFN_BASE
        if self.mirror and not gmem_pfn.all():
            bad("mirror_maps_gmem", "a mirror leaf maps a non-guest_memfd pfn", gfn=g)
        gi = np.flatnonzero(gmem_pfn)
        if len(gi):
            self.private(slot, sl_g[gi], sl_p[gi])
        hi = np.flatnonzero(~gmem_pfn)
        if len(hi):
            self.shared(slot, sl_g[hi], sl_p[hi])

    def private(self, slot: Memslot, sl_g: np.ndarray, sl_p: np.ndarray) -> None:
        """Private (guest_memfd) pfns: the right file page, still allocated (rules 8, 16)."""
        vm, bad = self.vm, self.bad
        file = vm.gmem.lookup(slot.guest_memfd)
        want = None
        if file is not None:
            want = file.base_pfn + (sl_g - slot.base_gfn + slot.gmem_pgoff)
        if file is None or want is None or not np.array_equal(want, sl_p):
            owner = vm.gmem.pfn_owner(int(sl_p[0]))
            freed = owner is None or owner[0].closed or not owner[0].is_allocated(owner[1], 1)[0]
            bad(
                "no_freed_page_mapped" if freed else "gmem_pfn_matches_binding",
                "a private leaf maps a guest_memfd page that is not this slot's"
                + (" and is FREED (use-after-free)" if freed else ""),
                gfn=int(sl_g[0]),
            )
        else:
            alloc = file.is_allocated(int(want[0] - file.base_pfn), int(want[-1] - want[0]) + 1)
            rel = (want - want[0]).astype(np.int64)
            if file.closed or not alloc[rel].all():
                bad(
                    "no_freed_page_mapped",
                    "a leaf maps a guest_memfd page that was freed (use-after-free)",
                    gfn=int(sl_g[0]),
                )
        if vm.has_private_mem and not slot.gmem_only:
            priv = vm.attrs.private_mask(int(sl_g[0]), int(sl_g[-1]) + 1)
            if not priv[(sl_g - sl_g[0]).astype(np.int64)].all():
                bad("private_leaf_attribute", "a private leaf on a SHARED gfn", gfn=int(sl_g[0]))

    def shared(self, slot: Memslot, sl_g: np.ndarray, sl_p: np.ndarray) -> None:
        """Shared pfns: the slot's host pages, not discarded, not on a PRIVATE gfn."""
        vm, bad, sp = self.vm, self.bad, self.sp
        hva_pfn = hva_to_pfn(slot.userspace_addr) + (sl_g - slot.base_gfn)
        if not np.array_equal(hva_pfn, sl_p):
            bad("shared_pfn_matches_hva", "a shared leaf maps another host page", gfn=int(sl_g[0]))
        lo_p, hi_p = int(sl_p.min()), int(sl_p.max()) + sp
        if len(vm.host.freed) and vm.host.freed.overlap(lo_p, hi_p):
            for j in range(min(len(sl_p), ENTRIES)):
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
            and not self.mirror
            and vm.attrs.private.overlap(int(sl_g[0]), int(sl_g[-1]) + sp)
        ):
            if self.level > 1:
                # A huge leaf must not cover a PRIVATE gfn anywhere in its span.
                hit = any(vm.attrs.private.overlap(int(g), int(g) + sp) for g in sl_g)
            else:
                priv = vm.attrs.private_mask(int(sl_g[0]), int(sl_g[-1]) + 1)
                hit = bool(priv[(sl_g - sl_g[0]).astype(np.int64)].any())
            if hit:
                bad("shared_leaf_attribute", "a shared leaf on a PRIVATE gfn", gfn=int(sl_g[0]))


def _page_freed(vm: KvmState, pfn: int, npages: int) -> bool:
    """Whether the host page(s) behind `pfn` are back with the host allocator."""
    if pfn >= S.GMEM_PFN_BASE:
        owner = vm.gmem.pfn_owner(pfn)
        return owner is None or owner[0].closed or not owner[0].is_allocated(owner[1], 1)[0]
    return bool(len(vm.host.freed)) and vm.host.freed.overlap(pfn, pfn + npages) > 0
