"""`KvmState`: the state of one simulated KVM VM as data (memslot sets, MMU, guest_memfd,
attributes, host memory, TDX, dirty bitmaps, counters, zap events) with the few accessors the
engine's modules share. The modules take a `KvmState`; `Vm` (vm.py) is the front built on it:
creation, `apply` and the queries.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from . import addr as A
from . import capabilities as caps
from . import spte as S
from . import uapi
from .attributes import MemoryAttributes
from .errors import KvmError, einval
from .gmem import GmemFile, GmemTable
from .host_profile import DEFAULT_HOST, HostProfile
from .hostmem import HostMemory
from .intervals import IntervalSet
from .memslots import Memslot, MemslotSet
from .revision import ENGINE_REV, ENGINE_REVS
from .roots import Mmu, Root, RootRole, ZapAcc
from .stats import KVM_STAT_NAMES
from .tdx import TdxState
from .uapi import VmType
from .vcpu import Vcpu

EXTRA_STAT_NAMES = (
    "refaults",
    "zaps_all_fast",
    "zaps_slot_leafs",
    "zaps_range",
    "zaps_notifier",
    "zaps_total_sptes",
    "mmio_sptes",
    "memslot_generation_wraps",
    "pml_entries",
    "pml_full_exits",
)
DEFAULT_TABLE_BUDGET = 1 << 20  # page-table pages per VM (4 GiB of tables)
_SLOT_ZAP_ALL = int(uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL)


class KvmState:
    """Everything one VM holds, and the accessors its modules share (vCPU and memslot lookup,
    the root a vCPU runs on, dirty bitmaps, the page-table budget)."""

    def __init__(
        self,
        vm_type: int,
        nr_vcpus: int,
        paging_levels: int,
        name: str | None,
        table_budget: int = DEFAULT_TABLE_BUDGET,
        td_lifecycle: bool = False,
        host: HostProfile = DEFAULT_HOST,
        engine_rev: int = ENGINE_REV,
    ) -> None:
        self.vm_type = VmType(vm_type)
        self._host = host
        self.name = name
        self.paging_levels = paging_levels
        self.nr_as = uapi.nr_address_spaces(vm_type)
        self.has_private_mem = uapi.vm_has_private_mem(vm_type)
        self.is_tdx = vm_type == VmType.KVM_X86_TDX_VM
        # TDX: the shared bit is GPA bit 47 (4-level EPT) or 51 (5-level), as a GFN bit.
        self.gfn_direct_bits = A.shared_gfn_bit(paging_levels) if self.is_tdx else 0
        self.max_gfn = A.gpa_to_gfn(1 << uapi.HOST_MAXPHYADDR) - 1
        self.gpa_limit = A.gfn_to_gpa(1 << (9 * paging_levels))
        self.user_addr_end = uapi.USER_ADDR_END_4LEVEL
        self.disabled_quirks = caps.initial_disabled_quirks(vm_type)
        self.manual_dirty_log = 0
        self.hypercall_exit_enabled = 0  # KVM_CAP_EXIT_HYPERCALL: hypercalls that exit
        self.zap_policy = "kvm"
        self.table_budget = table_budget
        self.vcpus: dict[int, Vcpu] = {}
        self.spaces = [MemslotSet(a) for a in range(self.nr_as)]
        # A token, not the VM: a reference back to the VM would make a cycle that keeps its
        # page tables alive after it is dropped, until the collector's oldest generation runs.
        self.gmem = GmemTable(owner=object())
        self.attrs = MemoryAttributes()
        self.host = HostMemory()
        self.mmu = Mmu(paging_levels)
        self.mmu.count_gmem = self.has_private_mem and not self.is_tdx
        self.set_engine_rev(engine_rev)
        self.tdx = TdxState(lifecycle=td_lifecycle) if self.is_tdx else None
        self.dirty: dict[tuple[int, int], np.ndarray] = {}  # slot key -> bool[npages]
        # Slots whose logging began with KVM_DIRTY_LOG_INITIALLY_SET: huge leaves may stay
        # until KVM_CLEAR_DIRTY_LOG splits them.
        self.dirty_initially_set: set[tuple[int, int]] = set()
        self.zapped = IntervalSet()  # GFNs whose mapping a zap removed and no fault restored
        # (as_id, first GFN) of 4K tables an exec fault built where a huge page was possible
        # (host.nx_huge_pages): the recovery worker's candidates, oldest first.
        self.nx_huge_pages: list[tuple[int, int]] = []
        self.stats_kvm = dict.fromkeys(KVM_STAT_NAMES, 0)
        self.stats_extra: dict[str, int] = dict.fromkeys(EXTRA_STAT_NAMES, 0)
        self.events: list[dict[str, Any]] = []
        self.event_seq = 0
        self.destroyed = False
        self.bugged: str | None = None  # KVM_BUG_ON fired: every later ioctl fails with EIO
        self.now = 0.0
        self.replay_durations: list[int] = []
        self.last_durations: list[int] = []
        self.answering = True  # whether the running call's caller reads its answer (Vm.apply)
        for i in range(nr_vcpus):
            self.vcpus[i] = Vcpu(i)

    def set_engine_rev(self, rev: int) -> None:
        """The behaviour revision the VM was created under (ENGINE_REV); replay of a VM journaled
        under an older one keeps that one's behaviour."""
        if isinstance(rev, bool) or rev not in ENGINE_REVS:
            raise einval(f"engine_rev must be one of {sorted(ENGINE_REVS)}")
        self.engine_rev = rev
        self.mmu.split_on_fault = rev >= 2
        self.mmu.nx_huge_pages = rev >= 2 and self._host.nx_huge_pages

    @property
    def host_profile(self) -> HostProfile:
        return self._host

    @host_profile.setter
    def host_profile(self, profile: HostProfile) -> None:
        self._host = profile
        self.set_engine_rev(self.engine_rev)

    @property
    def quirk_zap_all(self) -> bool:
        return not self.disabled_quirks & _SLOT_ZAP_ALL

    @property
    def ipat(self) -> bool:
        # WB with IPAT while IGNORE_GUEST_PAT is active and no non-coherent DMA
        # (kvm-private-tdx.md §1.6.3).
        return not self.disabled_quirks & uapi.Quirk.KVM_X86_QUIRK_IGNORE_GUEST_PAT

    def vcpu(self, id: object) -> Vcpu:
        if isinstance(id, bool) or not isinstance(id, int) or id not in self.vcpus:
            raise KvmError(errno.ENOENT, f"no vCPU {id!r}")
        return self.vcpus[id]

    def install_mmio_spte(self, vcpu: Vcpu, pos: int, gfn: int) -> bool:
        """Cache 'no memslot' for the GFN in the direct root (kvm-private-tdx.md
        §1.5.3); TDX value is 0.

        Returns whether a new SPTE was written: a hit on a valid cached one takes KVM's MMIO
        fast path (no page fault at all).
        """
        if pos > self.max_gfn or self.mmu.pool.live + self.paging_levels > self.table_budget:
            return False  # KVM then emulates without caching an MMIO SPTE
        table = self.mmu.table_for(self.root_for(vcpu, RootRole.DIRECT), pos, 1, ZapAcc())
        value = S.mmio_spte(gfn, self.spaces[vcpu.as_id].generation)
        if self.is_tdx:
            value &= ~(S.EPT_MMIO_VALUE | S.SUPPRESS_VE)
        ent = self.mmu.pool.entries(table)
        old = int(ent[pos & 511])
        if old & S.SPTE_MMU_PRESENT or old == value:
            return False
        ent[pos & 511] = np.uint64(value)
        self.stats_extra["mmio_sptes"] += 1
        return True

    def root_for(self, vcpu: Vcpu, role: RootRole) -> Root:
        """The root the vCPU runs on: reloaded when it became obsolete (counted), switched
        when the vCPU entered or left SMM (another address space, another root)."""
        rid = vcpu.roots.get(role)
        root = self.mmu.roots.get(rid) if rid is not None else None
        if root is None or not root.valid or root.as_id != vcpu.as_id:
            if rid is not None and (root is None or not root.valid):
                vcpu.stats["root_reloads"] += 1
            root = self.mmu.get_root(vcpu.as_id, role)
            vcpu.roots[role] = root.id
        return root

    def mirror_table(self, root: Root, gfn: int) -> int:
        """The mirror leaf table for `gfn`; each new mirror table is linked with SEPT.ADD."""
        before = self.mmu.pool.live
        table = self.mmu.table_for(root, gfn, 1, ZapAcc())
        assert self.tdx is not None
        for level in range(1, self.mmu.pool.live - before + 1):
            self.tdx.sept_add(gfn & ~((1 << (9 * level)) - 1), level)
        return table

    def vstat(self, vcpu: Vcpu, name: str, n: int = 1) -> None:
        vcpu.stats[name] += n

    def gmem_allocate(self, file: GmemFile, first: int, count: int) -> None:
        file.allocate(first, count)

    def account_nx_huge_page(self, as_id: int, gfn: int) -> None:
        """track_possible_nx_huge_page: nx_lpage_splits counts them."""
        self.nx_huge_pages.append((as_id, gfn))
        self.stats_kvm["nx_lpage_splits"] = len(self.nx_huge_pages)

    def pml_log(self, slot: Memslot, gfns: np.ndarray) -> None:
        """The CPU logs each GPA in the PML buffer (512 entries); a full buffer is a
        PML-full VM exit, after which KVM moves the entries to the dirty bitmap."""
        n = len(gfns)
        if not n:
            return
        self.mark_dirty(slot, gfns)
        before = self.stats_extra["pml_entries"]
        self.stats_extra["pml_entries"] = before + n
        self.stats_extra["pml_full_exits"] += (before + n) // 512 - before // 512

    def mark_dirty(self, slot: Memslot, gfns: np.ndarray) -> None:
        bm = self.dirty.get((slot.as_id, slot.id))
        if bm is not None:
            bm[np.asarray(gfns, dtype=np.int64) - slot.base_gfn] = True

    def check_table_budget(self, size: int) -> None:
        self._check_budget(self._budget_for(size))

    def private_mapped(self, vcpu: Vcpu, gfn: int) -> bool:
        """Whether a valid mirror root maps `gfn` (its guest_memfd page is in use)."""
        for root in self.mmu.roots_of(vcpu.as_id):
            if root.role is RootRole.MIRROR and root.valid:
                _t, _i, _level, e = self.mmu.lookup(root, gfn)
                if e & S.SPTE_MMU_PRESENT:
                    return True
        return False

    def _check_budget(self, need: int) -> None:
        if self.mmu.pool.live + need > self.table_budget:
            raise KvmError(errno.ENOMEM, "the service's page-table budget for this VM is spent")

    def _budget_for(self, size: int) -> int:
        """Tables a call over `size` bytes may build at most: its leaf tables plus one path
        per level above them (checked before anything is allocated)."""
        pages = A.pages(size)
        return -(-pages // 512) + -(-pages // (512 * 512)) + self.paging_levels - 1

    def alloc_dirty(self, slot: Memslot) -> None:
        key = (slot.as_id, slot.id)
        if self.manual_dirty_log & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
            self.dirty[key] = np.ones(slot.npages, dtype=bool)
            self.dirty_initially_set.add(key)
        else:
            self.dirty[key] = np.zeros(slot.npages, dtype=bool)

    def free_dirty(self, key: tuple[int, int]) -> None:
        self.dirty.pop(key, None)
        self.dirty_initially_set.discard(key)

    def lookup_slot(self, slot: object) -> Memslot:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= 0xFFFFFFFF:
            raise einval("slot must be a u32")
        as_id, id = slot >> 16, slot & 0xFFFF
        if as_id >= self.nr_as or id >= uapi.KVM_USER_MEM_SLOTS:
            raise einval(f"slot {slot:#x}: address space or id out of range")
        s = self.spaces[as_id].get(id)
        if s is None:
            raise KvmError(errno.ENOENT, f"no memslot {slot:#x}")
        return s
