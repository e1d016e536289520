"""The TDP page-fault path: a guest touching memory, a load/store, KVM_PRE_FAULT_MEMORY.

Work is done one page-table page at a time: a run of GFNs that share a slot, a privacy and a
leaf table is classified and written with numpy, never page by page (kvm-private-tdx.md §2).
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import spte as S
from .addr import end_page, gfn_to_gpa, gpa_to_gfn, hva_to_hpn, hva_to_pfn, strip_shared_gpa
from .errors import KvmError, einval
from .op import Op, operation
from .paging import span
from .roots import Root, RootRole, ZapAcc, index_runs
from .trace import Kind, Link, sptep
from .uapi import (
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SIZE,
    ExitReason,
)
from .zap import account_fault_zaps

if TYPE_CHECKING:
    from .gmem import GmemFile
    from .memslots import Memslot
    from .state import KvmState
    from .vcpu import Vcpu

ACCESS_KINDS = ("read", "write", "exec")
_LOG_DIRTY = int(KVM_MEM_LOG_DIRTY_PAGES)  # plain ints: IntFlag arithmetic is slow on hot paths
_READONLY = int(KVM_MEM_READONLY)
_U_HOST_WRITABLE = np.uint64(S.EPT_HOST_WRITABLE)
LEVEL_NAMES = {1: "4k", 2: "2m", 3: "1g"}
_ARANGE = np.arange(512, dtype=np.uint64)
_ARANGE_I = np.arange(512, dtype=np.int64)


class Exit(Exception):
    """The guest's access ended in an exit to userspace (not an API error)."""

    def __init__(self, info: dict[str, object]) -> None:
        super().__init__(info.get("reason"))
        self.info = info


@dataclass(slots=True)
class FaultResult:
    pages: int = 0
    mapped: int = 0
    spurious: int = 0
    refaults: int = 0
    wp_fixed: int = 0
    levels: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    exit: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "mapped": self.mapped,
            "spurious": self.spurious,
            "refaults": self.refaults,
            "write_protect_fixed": self.wp_fixed,
            "levels": {LEVEL_NAMES[lv]: self.levels[lv] for lv in (1, 2, 3)},
            "exit": self.exit,
        }


def mmio_exit(gpa: int, length: int, is_write: bool) -> Exit:
    return Exit(
        {"reason": ExitReason.KVM_EXIT_MMIO.name, "gpa": gpa, "len": length, "is_write": is_write}
    )


def emulation_failure_exit() -> Exit:
    """handle_emulation_failure for a CPL-0 guest: KVM_EXIT_INTERNAL_ERROR, suberror
    KVM_INTERNAL_ERROR_EMULATION (vkmmu's guests run at CPL 0)."""
    return Exit(
        {
            "reason": ExitReason.KVM_EXIT_INTERNAL_ERROR.name,
            "suberror": KVM_INTERNAL_ERROR_EMULATION,
            "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
        }
    )


def memory_fault_exit(gfn: int, private: bool, size: int = PAGE_SIZE) -> Exit:
    return Exit(
        {
            "reason": ExitReason.KVM_EXIT_MEMORY_FAULT.name,
            "gpa": gfn_to_gpa(gfn),
            "size": size,
            "flags": KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0,
        }
    )


class FaultPath:
    """One vCPU's faults against one VM; holds the per-call state (root, result, zap acc)."""

    def __init__(self, vm: KvmState, vcpu: Vcpu, access: str, *, prefetch: bool = False) -> None:
        self.vm = vm
        self.vcpu = vcpu
        self.write = access == "write"
        self.exec_ = access == "exec"
        self.prefetch = prefetch
        self.res = FaultResult()
        self.acc = ZapAcc()  # huge leaves replaced by tables on the way
        self.gpa = 0
        if vcpu is not None:
            vm.mmu.trace.cpu = vcpu.id

    # -- classification ---------------------------------------------------------------------
    def classify(self, pos: int, private_hint: bool | None) -> tuple[int, bool]:
        """(gfn without the shared bit, is_private) for GFN position `pos` (§2.1)."""
        vm = self.vm
        if vm.is_tdx:
            shared = bool(pos & vm.gfn_direct_bits)
            return pos & ~vm.gfn_direct_bits, not shared
        if vm.has_private_mem:
            return pos, vm.attrs.get(pos) != 0
        return pos, False

    def max_level(self, slot: Memslot, gfn: int, private: bool) -> int:
        """kvm_mmu_max_mapping_level (§2.4): lpage_info, dirty logging, host page size."""
        vm = self.vm
        if private or slot.gmem_only:
            return 1  # guest_memfd hands out order-0 folios; TDX caps private at 4K anyway
        if slot.flags & _LOG_DIRTY:
            return 1
        level = min(KVM_MAX_HUGEPAGE_LEVEL, vm.host.mapping_level(hva_to_hpn(slot.hva(gfn))))
        hva_gfn = hva_to_hpn(slot.userspace_addr)
        while level > 1:
            n = span(level)
            rs = gfn & ~(n - 1)
            if (
                rs >= slot.base_gfn
                and rs + n <= slot.end_gfn
                and not (slot.base_gfn ^ hva_gfn) & (n - 1)
                and (not vm.has_private_mem or vm.attrs.is_uniform(rs, rs + n))
            ):
                return level
            level -= 1
        return 1

    def maps_2m(self, slot: Memslot, gfns: np.ndarray) -> np.ndarray:
        """`max_level(slot, gfn, False) >= 2` for each 2 MiB-aligned GFN of `gfns` (int64) at
        once, for a VM without private memory (attributes are not read): a shared slot not
        logging dirty pages, the region inside it, GFN and HVA aligned alike within 2 MiB,
        and a host huge page behind it."""
        vm, n = self.vm, span(2)
        hva_gfn = hva_to_hpn(slot.userspace_addr)
        if slot.gmem_only or slot.flags & _LOG_DIRTY or (slot.base_gfn ^ hva_gfn) & (n - 1):
            return np.zeros(len(gfns), dtype=bool)
        ok: np.ndarray = (gfns >= slot.base_gfn) & (gfns + n <= slot.end_gfn)
        ok &= vm.host.mapping_levels(hva_gfn + (gfns - slot.base_gfn)) >= 2
        return ok

    def attr_run_end(self, gfn: int, end: int, private: bool) -> int:
        """First GFN in [gfn, end) whose PRIVATE attribute differs from `private`."""
        iv = self.vm.attrs.private
        i = bisect_right(iv.starts, gfn) - 1
        if private:
            return min(end, iv.ends[i]) if i >= 0 and gfn < iv.ends[i] else gfn
        nxt = iv.starts[i + 1] if i + 1 < len(iv.starts) else end
        return min(end, nxt)

    def leaf_bits(self, level: int, host_writable: bool, ipat: bool) -> int:
        """A TDP fault passes ACC_ALL: writable whenever the host mapping is; a prefetch
        leaves the Accessed bit clear (§1.6.1)."""
        return S.leaf_bits(
            level=level,
            writable=True,
            host_writable=host_writable,
            # nx_huge_pages: make_spte drops exec from huge leaves (an exec fault splits them).
            exec_=level == 1 or not self.vm.host_profile.nx_huge_pages,
            ipat=ipat,
            accessed=not self.prefetch,
        )

    # -- the walk -----------------------------------------------------------------------------
    def run(self, gpa: int, size: int, private_hint: bool | None = None) -> FaultResult:
        self.gpa = gpa
        pos: int = gpa_to_gfn(gpa)
        end = end_page(gpa, size)
        try:
            while pos < end:
                pos += self.chunk(pos, end, gpa + size, private_hint)
        except Exit as e:
            self.res.exit = e.info
        finally:
            account_fault_zaps(self.vm, self.acc)
        return self.res

    def chunk(self, pos: int, end: int, byte_end: int, private_hint: bool | None) -> int:
        """Handle GFN positions [pos, …) that share a slot, privacy and table; return count."""
        vm = self.vm
        gfn, private = self.classify(pos, private_hint)
        shared_bits = pos - gfn
        if vm.has_private_mem and private != (vm.attrs.get(gfn) != 0):
            raise memory_fault_exit(gfn, private)  # §2.3.1 step 3
        slot = vm.spaces[self.vcpu.as_id].find(gfn)
        if slot is None:  # kvm_handle_noslot_fault (kvm-private-tdx.md §2.3.1 step 4)
            self.no_slot(pos, gfn, private, byte_end)
        assert slot is not None
        if self.write and slot.flags & _READONLY:  # emulated as MMIO (kvm-private-tdx.md §2.3.2)
            at = max(gfn_to_gpa(pos), self.gpa)
            raise mmio_exit(strip_shared_gpa(at, shared_bits), min(8, byte_end - at), True)
        gmem = None
        if private or slot.gmem_only:
            gmem = gmem_for_fault(vm, slot, gfn, private)
        # The run this table can serve.
        stop = min(end - shared_bits, slot.end_gfn)
        if vm.has_private_mem:
            stop = self.attr_run_end(gfn, stop, private)
        if vm.is_tdx and private:
            return self.tdx_private(slot, gfn, stop, gmem)
        if vm.is_tdx and self.exec_:
            self.shared_exec_bug(pos)
        return self.map_shared(slot, gfn, shared_bits, stop, private, gmem)

    def map_shared(
        self,
        slot: Memslot,
        gfn: int,
        sbits: int,
        stop: int,
        private: bool,
        gmem: GmemFile | None,
    ) -> int:
        """The direct root's leaves for the run from `gfn`: huge, whole 4K tables, or 4K."""
        vm = self.vm
        level = self.max_level(slot, gfn, private)
        # NX huge pages: an exec fault maps 4K where a huge page was possible
        # (disallowed_hugepage_adjust; the table is a possible NX huge page).
        nx = self.exec_ and level > 1 and vm.host_profile.nx_huge_pages
        root = vm.root_for(self.vcpu, RootRole.DIRECT)
        if level > 1 and not nx:
            done = self.map_2m_tables(root, slot, gfn, sbits, stop) if level == 2 else 0
            done = done or self.map_huge_run(root, slot, gfn, sbits, stop, level)
            return done or self.map_huge(root, slot, gfn, sbits, stop, level)
        if not nx and vm.mmu.bulk and self.only_4k(slot, private):
            done = self.map_4k_tables(root, slot, gfn, sbits, stop, gmem)
            if done:
                return done
        return self.map_4k(root, slot, gfn, sbits, stop, gmem, nx)

    def no_slot(self, pos: int, gfn: int, private: bool, byte_end: int) -> None:
        """kvm_handle_noslot_fault: always ends in an exit (or the KVM_BUG_ON)."""
        vm = self.vm
        if private:
            raise memory_fault_exit(gfn, True)
        if vm.is_tdx and self.exec_:
            self.shared_exec_bug(pos)
        if vm.install_mmio_spte(self.vcpu, pos, gfn) and not self.prefetch:
            vm.vstat(self.vcpu, "pf_mmio_spte_created")
            self.fault()
        if self.exec_:
            # RET_PF_EMULATE, but the emulator cannot fetch the instruction from a GPA
            # without a memslot (reexecute_instruction: no slot) → emulation failure.
            raise emulation_failure_exit()
        at = max(gfn_to_gpa(pos), self.gpa)
        # KVM reports a TD's shared MMIO GPA without the shared bit.
        shared_bits = pos - gfn
        raise mmio_exit(strip_shared_gpa(at, shared_bits), min(8, byte_end - at), self.write)

    def only_4k(self, slot: Memslot, private: bool) -> bool:
        """Whether every GFN of the slot maps at 4K (max_level is 1 throughout): guest_memfd
        and dirty-logged slots, or a host without huge pages anywhere."""
        return private or slot.gmem_only or bool(slot.flags & _LOG_DIRTY) or not self.vm.host.runs()

    def shared_exec_bug(self, pos: int) -> None:
        """A TD cannot execute from shared memory: tdx_handle_ept_violation's KVM_BUG_ON,
        before any memslot lookup (kvm-private-tdx.md §5.5)."""
        vm = self.vm
        vm.bugged = f"instruction fetch from shared GPA {gfn_to_gpa(pos):#x}"
        err = KvmError(errno.EIO, f"KVM_BUG_ON: {vm.bugged}; the VM is dead")
        err.state_changed = True
        raise err

    # -- huge leaves ------------------------------------------------------------------------------
    def map_huge(
        self, root: Root, slot: Memslot, gfn: int, sbits: int, stop: int, level: int
    ) -> int:
        vm, mmu, res = self.vm, self.vm.mmu, self.res
        n = span(level)
        rs = gfn & ~(n - 1)
        touched = min(stop, rs + n) - gfn
        table, i, found_level, e = mmu.lookup(root, gfn | sbits)
        if e & S.SPTE_MMU_PRESENT and e & S.EPT_PS:
            self._touch_present(root, table, i, 1, found_level, slot, gfn, touched)
            return touched
        if e & S.SPTE_MMU_PRESENT:
            # 4K leaves mapped before a huge page became possible: touching them is no fault.
            ent = mmu.pool.entries(table)[i : i + min(stop - gfn, 512 - i)]
            present = (ent & S.U_PRESENT) != 0
            k = len(ent) if present.all() else int(np.argmin(present))
            self._touch_present(root, table, i, k, 1, slot, gfn, k)
            res.pages += k
            return k
        host_w = not slot.flags & _READONLY
        pfn = hva_to_pfn(slot.hva(rs))
        leaf = self.leaf_bits(level, host_w, vm.ipat) | (pfn << S.PFN_SHIFT)
        tr = mmu.trace
        # kvm_mmu_spte_requested: the faulting page's pfn, at the goal level.
        tr.append(Kind.SPTE_REQUESTED, gfn | sbits, level, pfn + (gfn - rs))
        table = mmu.table_for(root, rs | sbits, level, self.acc)
        i = ((rs | sbits) >> (9 * (level - 1))) & 511
        old = int(mmu.pool.entries(table)[i])
        if old & S.SPTE_MMU_PRESENT:  # a table (maybe emptied by a precise zap) is in the way
            if self.prefetch:
                res.spurious += touched  # a prefetch never replaces a present SPTE
                res.pages += touched
                return touched
            before = len(self.acc.runs)
            mmu.replace_table(root, table, i, leaf, self.acc)
            del self.acc.runs[before:]  # remapped at once by the huge leaf: nothing to refault
            self.acc.flush = True  # a present SPTE was replaced: the kernel flushes
            self.fault()
        else:
            tr.spte_changed(root.as_id, rs | sbits, level, old, leaf)
        tr.append(Kind.SET_SPTE, rs | sbits, level, leaf, sptep(table, i))
        mmu.set_leaves(root, table, i, np.array([leaf], dtype=np.uint64), level)
        vm.host.touch(pfn, pfn + n)
        self._mapped(rs, rs + n, level)
        res.pages += touched
        return touched

    def map_huge_run(
        self, root: Root, slot: Memslot, gfn: int, sbits: int, stop: int, level: int
    ) -> int:
        """Huge leaves of `level` over missing entries from an aligned `gfn` on (whole regions
        up to `stop`, within one host page-size run and one table) in one pass: what one
        `map_huge` per leaf does (same SPTEs, trace records, counts). Returns the GFNs
        mapped; 0 when the run does not start with such a region."""
        vm, mmu = self.vm, self.vm.mmu
        pos, sp = gfn | sbits, span(level)
        if not mmu.bulk or pos & (sp - 1) or vm.has_private_mem:
            return 0
        pfn0 = hva_to_pfn(slot.hva(gfn))
        host_level, host_end = vm.host.run_at(pfn0)
        n = min(stop - gfn, host_end - pfn0) // sp
        if host_level != level or n < 2:
            return 0
        head: list[Link] = []
        found = mmu.absent_run(root, pos, n, level, head)
        if found is None or found[1] == found[2]:
            return 0
        table, i, j = found
        count = (j - i) * sp
        bits = self.leaf_bits(level, not slot.flags & _READONLY, vm.ipat)
        pfns = np.uint64(pfn0) + np.arange(j - i, dtype=np.uint64) * np.uint64(sp)
        leaves = np.uint64(bits) | (pfns << np.uint64(S.PFN_SHIFT))
        ent = mmu.pool.entries(table)
        mmu.trace.huge_leaves_set(root.as_id, pos, level, table, i, ent[i:j].copy(), leaves, head)
        mmu.set_leaves(root, table, i, leaves, level)
        vm.host.touch(pfn0, pfn0 + count)
        self._mapped(gfn, gfn + count, level, leaves=j - i)
        self.res.pages += count
        return count

    def map_2m_tables(self, root: Root, slot: Memslot, gfn: int, sbits: int, stop: int) -> int:
        """Whole level-2 tables of 2 MiB leaves from a 1 GiB-aligned `gfn` on (missing ones,
        up to `stop`, within one host page-size run and one level-3 table), built, linked and
        filled in one pass: what one `map_huge_run` per table does (same rows, SPTEs, trace
        records, counts). Returns the GFNs mapped; 0 when the run does not start with such
        a table."""
        vm, mmu = self.vm, self.vm.mmu
        pos = gfn | sbits
        if not mmu.bulk or pos & (span(3) - 1) or vm.has_private_mem:
            return 0
        pfn0 = hva_to_pfn(slot.hva(gfn))
        host_level, host_end = vm.host.run_at(pfn0)
        n = min(stop - gfn, host_end - pfn0) // span(3)
        if host_level != 2 or not n:
            return 0
        head: list[Link] = []
        found = mmu.absent_run(root, pos, n, 3, head)
        if found is None or found[1] == found[2]:
            return 0
        parent, i, j = found
        rows, old, new = mmu.link_tables(root, parent, i, j, pos)
        bits = self.leaf_bits(2, not slot.flags & _READONLY, vm.ipat)
        mmu.pool.write_leaf_rows(rows, pfn0, bits, level=2)
        mmu.trace.huge_tables_set(root.as_id, rows, pos, pfn0, bits, head, (old, new))
        leaves = (j - i) * 512
        root.leaves[2] += leaves
        mmu.pages[2] += leaves
        count = leaves * 512
        vm.host.touch(pfn0, pfn0 + count)
        self._mapped(gfn, gfn + count, 2, leaves=leaves)
        self.res.pages += count
        return count

    # -- 4 KiB leaves ----------------------------------------------------------------------------
    def map_4k(
        self,
        root: Root,
        slot: Memslot,
        gfn: int,
        sbits: int,
        stop: int,
        gmem: GmemFile | None,
        nx: bool = False,
    ) -> int:
        """One leaf table's run of [gfn, stop): new leaves where none is present, a touch
        of the present ones."""
        vm, mmu = self.vm, self.vm.mmu
        pos = gfn | sbits
        count = min(stop - gfn, 512 - (pos & 511))
        table, i, found_level, e = mmu.lookup(root, pos)
        if found_level > 1 and e & S.SPTE_MMU_PRESENT and e & S.EPT_PS:
            # A huge leaf already maps this run (mapped before dirty logging or attributes changed).
            touched = min(count, span(found_level) - (gfn & (span(found_level) - 1)))
            if not (self.write and not e & S.EPT_W) and not (self.exec_ and not e & S.EPT_X):
                self._touch_present(root, table, i, 1, found_level, slot, gfn, touched)
                return touched
            if mmu.split_on_fault:
                return self.split_fault(root, slot, gfn, pos, count, e, found_level, nx)
        links: list[Link] | None = [] if mmu.trace.enabled else None  # traced with the leaves
        live = mmu.pool.live
        table = mmu.table_for(root, pos, 1, self.acc, links)
        if nx and mmu.pool.live > live:
            vm.account_nx_huge_page(root.as_id, pos & ~511)
        lo = pos & 511
        present = (mmu.pool.entries(table)[lo : lo + count] & S.U_PRESENT) != 0
        fresh = not present.any()  # the common case: a whole run of new leaves
        new = _ARANGE_I[:count] if fresh else np.flatnonzero(~present)
        if len(new):
            self._install_4k(root, table, slot, gfn, sbits, count, new, fresh, gmem, links)
        if len(new) < count:
            self._touch_present(root, table, lo, count, 1, slot, gfn, count, skip=new)
        self.res.pages += count
        return count

    def split_fault(
        self,
        root: Root,
        slot: Memslot,
        gfn: int,
        pos: int,
        count: int,
        huge: int,
        level: int,
        nx: bool,
    ) -> int:
        """A 4K fault under a huge leaf the access may not use: a write to one write-protected
        for dirty logging, an exec under nx_huge_pages. kvm_tdp_mmu_map splits it level by
        level (tdp_mmu_split_huge_page), then handles the target level: the faulting page's
        write gets its SPTE through the slow path (RET_PF_FIXED; fast_page_fault declines
        huge leaves of dirty-logged slots), an exec finds its child executable
        (RET_PF_SPURIOUS). The rest of the run are present leaves the guest touches next."""
        vm, mmu = self.vm, self.vm.mmu
        if self.write and not huge & S.EPT_HOST_WRITABLE:
            raise mmio_exit(gfn_to_gpa(gfn), 8, True)  # read-only host mapping
        pfn = ((huge & S.SPTE_BASE_ADDR_MASK) >> S.PFN_SHIFT) + (gfn & (span(level) - 1))
        mmu.trace.append(Kind.SPTE_REQUESTED, pos, 1, pfn)  # kvm_mmu_spte_requested
        live = mmu.pool.live
        table = mmu.table_for(root, pos, 1, self.acc)
        if nx and mmu.pool.live > live:
            vm.account_nx_huge_page(root.as_id, pos & ~511)
        lo = pos & 511
        ent = mmu.pool.entries(table)
        old = int(ent[lo])
        if self.write and not old & S.EPT_W:
            # make_spte (W and MMU-writable: a leaf write-protected by write_protect_gfn
            # lost both); the write then sets D.
            new = old | S.EPT_W | S.EPT_MMU_WRITABLE | S.EPT_A
            mmu.trace.spte_changed(root.as_id, pos, 1, old, new)
            mmu.trace.append(Kind.SET_SPTE, pos, 1, new, sptep(table, lo))
            ent[lo] = np.uint64(new | S.EPT_D)
            self._mapped(gfn, gfn + 1, 1)
            if slot.flags & _LOG_DIRTY:
                vm.mark_dirty(slot, np.array([gfn]))
            if count > 1:
                self._touch_present(root, table, lo + 1, count - 1, 1, slot, gfn + 1, count - 1)
        else:
            self.fault()
            self._touch_present(root, table, lo, count, 1, slot, gfn, count)
        self.res.pages += count
        return count

    def _install_4k(
        self,
        root: Root,
        table: int,
        slot: Memslot,
        gfn: int,
        sbits: int,
        count: int,
        new: np.ndarray,
        fresh: bool,
        gmem: GmemFile | None,
        links: list[Link] | None,
    ) -> None:
        """Leaves at entries `new` of the run of `count` entries from `gfn` in `table`."""
        vm, mmu, tr = self.vm, self.vm.mmu, self.vm.mmu.trace
        lo = (gfn | sbits) & 511
        ent = mmu.pool.entries(table)[lo : lo + count]
        before = (ent.copy() if fresh else ent[new]) if tr.enabled else None
        host_w = not slot.flags & _READONLY
        bits = np.uint64(self.leaf_bits(1, host_w, vm.ipat))
        pfn0 = self._backing(root, slot, gfn, count, len(new), gmem)
        if fresh:
            ent[:] = bits | ((np.uint64(pfn0) + _ARANGE[:count]) << S.U_SHIFT)
        else:
            pfns = np.uint64(pfn0) + new.astype(np.uint64)
            ent[new] = bits | (pfns << S.U_SHIFT)
        if before is not None:
            leaves = ent.copy() if fresh else ent[new]
            tr.leaves_set(root.as_id, table, lo + new, (gfn | sbits) - lo, 1, before, leaves, links)
        root.leaves[1] += len(new)
        mmu.pages[1] += len(new)
        if host_w and slot.flags & _LOG_DIRTY:
            vm.mark_dirty(slot, gfn + new)
        for a, b in [(0, count)] if fresh else index_runs(new):
            self._mapped(gfn + a, gfn + b, 1)

    def _backing(
        self, root: Root, slot: Memslot, gfn: int, count: int, new: int, gmem: GmemFile | None
    ) -> int:
        """The first pfn behind [gfn, gfn + count): guest_memfd pages (allocated now) or the
        host's pages (touched now); `new` leaves will map them."""
        vm = self.vm
        if gmem is not None:
            first = slot.gmem_index(gfn)
            vm.gmem_allocate(gmem, first, count)
            if vm.mmu.count_gmem:
                root.gmem_leaves += new
            return gmem.base_pfn + first
        pfn0: int = hva_to_pfn(slot.hva(gfn))
        vm.host.touch(pfn0, pfn0 + count)
        return pfn0

    def map_4k_tables(
        self, root: Root, slot: Memslot, gfn: int, sbits: int, stop: int, gmem: GmemFile | None
    ) -> int:
        """Whole leaf tables from a 512-aligned `gfn` on (up to `stop`, within one level-2
        table), missing or without a present leaf, filled in one pass (missing ones built and
        linked): what one `map_4k` per table does (same rows, SPTEs, trace records, counts),
        without a Python step per table. Returns the GFNs mapped; 0 when the run does not
        start with such a table."""
        vm, mmu = self.vm, self.vm.mmu
        pos = gfn | sbits
        if pos & 511 or stop - gfn < 512:
            return 0
        head: list[Link] = []
        found = mmu.leaf_table_run(root, pos, (stop - gfn) >> 9, head)
        if found is None or found[1] == found[2]:
            return 0
        parent, i, j, rows, before = found
        count = (j - i) * 512
        links = None
        if rows is None:
            rows, old, new = mmu.link_tables(root, parent, i, j, pos)
            links = (old, new)
        host_w = not slot.flags & _READONLY
        bits = self.leaf_bits(1, host_w, vm.ipat)
        pfn0 = self._backing(root, slot, gfn, count, count, gmem)
        mmu.pool.write_leaf_rows(rows, pfn0, bits)
        mmu.trace.tables_set(root.as_id, rows, pos, pfn0, bits, before, head, links)
        root.leaves[1] += count
        mmu.pages[1] += count
        if host_w and slot.flags & _LOG_DIRTY:
            vm.mark_dirty(slot, gfn + np.arange(count, dtype=np.int64))
        self._mapped(gfn, gfn + count, 1)
        self.res.pages += count
        return count

    def _touch_present(
        self,
        root: Root,
        table: int,
        lo: int,
        count: int,
        level: int,
        slot: Memslot,
        gfn: int,
        touched: int,
        skip: np.ndarray | None = None,
    ) -> None:
        """The guest touches already-present leaves: hardware sets A (and D on a write);
        a write to a write-protected leaf takes the fast page-fault path (§2.6). A prefetch
        leaves present SPTEs alone (RET_PF_SPURIOUS)."""
        vm, res = self.vm, self.res
        ent = vm.mmu.pool.entries(table)[lo : lo + count]
        mask = np.ones(len(ent), dtype=bool)
        remapped = False
        if skip is not None:
            mask[skip] = False
        if self.prefetch:
            pass
        elif self.write:
            if vm.host_profile.enable_pml and slot.flags & _LOG_DIRTY and level == 1:
                # PML: a write to a writable leaf whose D bit is clear logs the GPA in the
                # vCPU's PML buffer; no fault (kvm-memslots.md §5.3, vmx.c PML).
                clean = mask & ((ent & (S.U_W | S.U_D)) == S.U_W)
                vm.pml_log(slot, gfn + np.flatnonzero(clean))
            wp = mask & ((ent & S.U_W) == 0)
            if np.any(wp):
                remapped = self._write_protected(root, table, lo, level, slot, gfn, wp, mask)
            ent[mask] |= S.U_A | S.U_D
        elif not self.prefetch:
            ent[mask] |= S.U_A
        n_present = int(np.count_nonzero(mask)) if level == 1 else 0 if remapped else touched
        res.spurious += n_present
        if level > 1:
            res.pages += touched

    def _write_protected(
        self,
        root: Root,
        table: int,
        lo: int,
        level: int,
        slot: Memslot,
        gfn: int,
        wp: np.ndarray,
        mask: np.ndarray,
    ) -> bool:
        """A write to the write-protected leaves `wp` of entries lo, lo+1, …: the fast path
        restores W where MMU-writable stayed; the slow path maps again those that lost it too
        (taken off `mask`; returns whether there were any); a read-only host mapping exits."""
        vm = self.vm
        ent = vm.mmu.pool.entries(table)[lo : lo + len(wp)]
        if np.any(wp & ((ent & _U_HOST_WRITABLE) == 0)):
            raise mmio_exit(gfn_to_gpa(gfn), 8, True)  # read-only host mapping
        slow = wp & ((ent & S.U_MMU_WRITABLE) == 0)
        if np.any(slow):  # write_protect_gfn took MMU-writable too: no fast path
            self._remap_writable(root, table, lo, np.flatnonzero(slow), level, slot, gfn)
            wp &= ~slow
            mask &= ~slow
        idx = np.flatnonzero(wp)
        ent[idx] |= S.U_W | S.U_D
        self.res.wp_fixed += len(idx) * span(level)
        vm.vstat(self.vcpu, "pf_fast", len(idx))
        self.fault(len(idx))
        if slot.flags & _LOG_DIRTY and level == 1:
            vm.mark_dirty(slot, gfn + idx)
        return bool(np.any(slow))

    def _remap_writable(
        self, root: Root, table: int, lo: int, idx: np.ndarray, level: int, slot: Memslot, gfn: int
    ) -> None:
        """Writes to leaves `idx` (of entries lo, lo+1, …) that lost MMU-writable: the fast
        path declines them, the slow path makes each writable again (make_spte; RET_PF_FIXED)
        and the page is logged."""
        vm = self.vm
        ent = vm.mmu.pool.entries(table)
        at = lo + idx
        old = ent[at].copy()
        new = old | S.U_W | S.U_MMU_WRITABLE | S.U_A
        base = vm.mmu.pool.gfn(table)
        vm.mmu.trace.leaves_set(root.as_id, table, at, base, level, old, new)
        ent[at] = new | S.U_D
        first = gfn if level == 1 else gfn & ~(span(level) - 1)
        for a, b in index_runs(idx):
            self._mapped(first + a * span(level), first + b * span(level), level, b - a)
        if slot.flags & _LOG_DIRTY and level == 1:
            vm.mark_dirty(slot, gfn + idx)

    def _mapped(self, start: int, end: int, level: int, leaves: int = 1) -> None:
        """[start, end) mapped: at 4K, or by `leaves` huge leaves of `level`."""
        res = self.res
        n = end - start
        res.mapped += n
        res.levels[level] += leaves if level > 1 else n
        ref = self.vm.zapped.overlap(start, end)
        if ref:
            res.refaults += ref
            self.vm.zapped.remove(start, end)
            self.vm.stats_extra["refaults"] += ref
        faults = leaves if level > 1 else n  # one EPT violation per leaf installed
        if not self.prefetch:
            self.vm.vstat(self.vcpu, "pf_fixed", faults)
            self.fault(faults)

    def fault(self, n: int = 1) -> None:
        """vcpu->stat.pf_taken: real faults only (a pre-fault is not one)."""
        if not self.prefetch:
            self.vm.vstat(self.vcpu, "pf_taken", n)

    # -- TDX private ------------------------------------------------------------------------------
    def tdx_private(self, slot: Memslot, gfn: int, stop: int, gmem: GmemFile | None) -> int:
        """Private GPAs of a TD go through the mirror root and the TDX module (§5).

        Mirror SPTEs only ever go non-present → present → non-present (§5.4): a guest touch
        of an accepted page changes nothing in them.
        """
        vm, mmu, res, tdx = self.vm, self.vm.mmu, self.res, self.vm.tdx
        assert tdx is not None and gmem is not None
        root = vm.root_for(self.vcpu, RootRole.MIRROR)
        count = min(stop - gfn, 512 - (gfn & 511))
        table = vm.mirror_table(root, gfn)
        lo = gfn & 511
        ent = mmu.pool.entries(table)[lo : lo + count]
        present = (ent & S.U_PRESENT) != 0
        if self.prefetch:
            # Pre-fault / accept: AUG every missing page of the run (they are PENDING).
            self._aug(root, table, slot, gmem, gfn, np.flatnonzero(~present))
            res.spurious += int(np.count_nonzero(present))
            res.pages += count
            return count
        # Accepted pages are plain accesses; the first page that is not stops the run.
        ok = present & tdx.accepted_mask(gfn, count)
        k = count if ok.all() else int(np.argmin(ok))
        res.spurious += k
        res.pages += k
        if k == count:
            return count
        if not present[k]:
            # EPT violation on a private GPA: TDH.MEM.PAGE.AUG of that page; it is PENDING.
            self._aug(root, table, slot, gmem, gfn, np.array([k]))
            res.pages += 1
        # The guest touches a PENDING page: 6.18+ exits with MEMORY_FAULT, size 0 (§5.5).
        raise memory_fault_exit(gfn + k, True, size=0)

    def _aug(
        self, root: Root, table: int, slot: Memslot, gmem: GmemFile, gfn: int, idx: np.ndarray
    ) -> None:
        """Install mirror leaves at entries `idx` of the run starting at `gfn`, one PAGE.AUG
        per page; their pfns are the slot's guest_memfd pages."""
        if not len(idx):
            return
        vm, lo = self.vm, gfn & 511
        first = slot.gmem_index(gfn)
        vm.gmem_allocate(gmem, first + int(idx[0]), int(idx[-1] - idx[0]) + 1)
        bits = np.uint64(self.leaf_bits(1, True, False))
        pfns = np.uint64(gmem.base_pfn + first) + idx.astype(np.uint64)
        ent = vm.mmu.pool.entries(table)
        before = ent[lo + idx].copy()
        ent[lo + idx] = bits | (pfns << S.U_SHIFT)
        vm.mmu.trace.leaves_set(root.as_id, table, lo + idx, gfn - lo, 1, before, ent[lo + idx])
        root.leaves[1] += len(idx)
        vm.mmu.pages[1] += len(idx)
        for a, b in index_runs(idx):
            assert vm.tdx is not None
            vm.tdx.set_private_spte(gfn + a, b - a)
            self._mapped(gfn + a, gfn + b, 1)


def check_access_range(vm: KvmState, gpa: object, size: object, max_bytes: int) -> tuple[int, int]:
    if (
        isinstance(gpa, bool)
        or isinstance(size, bool)
        or not isinstance(gpa, int)
        or not isinstance(size, int)
        or gpa < 0
        or size <= 0
    ):
        raise einval("gpa and size must be non-negative integers, size > 0")
    if gpa + size > vm.gpa_limit:
        raise einval(f"range ends beyond the guest physical address space ({vm.gpa_limit:#x})")
    if size > max_bytes:
        raise KvmError(errno.E2BIG, f"one access call covers at most {max_bytes:#x} bytes")
    return gpa, size


@operation("access")
class Access(Op):
    """A vCPU touches [gpa, gpa + size): the TDP fault path for every page not mapped."""

    vcpu: int
    gpa: int
    size: int = PAGE_SIZE
    access: str = "read"
    private: bool | None = None


@operation("load")
class Load(Op):
    """A vCPU reads `len` bytes (at most one page) at `gpa`."""

    vcpu: int
    gpa: int
    len: int
    private: bool | None = None


@operation("store")
class Store(Op):
    """A vCPU writes `data` (hex, at most one page) at `gpa`."""

    vcpu: int
    gpa: int
    data: str
    private: bool | None = None


@operation("pre_fault")
class PreFault(Op):
    """KVM_PRE_FAULT_MEMORY."""

    vcpu: int
    gpa: int
    size: int
    flags: int = 0


@operation("accept")
class Accept(Op):
    """A TD guest's TDG.MEM.PAGE.ACCEPT (AUG first where the page is missing)."""

    vcpu: int
    gpa: int
    size: int = PAGE_SIZE


def gmem_for_fault(vm: KvmState, slot: Memslot, gfn: int, private: bool) -> GmemFile:
    """No guest_memfd behind the slot, or the file is gone → KVM_EXIT_MEMORY_FAULT
    (kvm-private-tdx.md §2.3.1 step 8; §4.5 for a closed file)."""
    file = vm.gmem.lookup(slot.guest_memfd)
    if slot.guest_memfd is None or file is None or file.closed:
        raise memory_fault_exit(gfn, private)
    return file
