"""Dirty logging: KVM_MEM_LOG_DIRTY_PAGES toggles, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG.

Without PML (the default host profile) dirty tracking write-protects leaves, and a write to a
protected leaf takes the fast page-fault path, which restores W and marks the page dirty
(kvm-memslots.md §3.4, §5.3). With host.enable_pml the leaves keep W and lose D; the CPU logs
the next write (faults.py, KvmState.pml_log).
"""

from __future__ import annotations

import base64
import errno
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import spte as S
from . import uapi
from .addr import hva_to_hpn
from .errors import KvmError, einval
from .faults import FaultPath
from .op import Op, operation
from .paging import ENTRIES, Cursor, TablePool, span, walk
from .roots import Root, RootRole, ZapAcc
from .trace import Kind
from .zap import finish, flush_tlbs

if TYPE_CHECKING:
    from .memslots import Memslot
    from .state import KvmState


def _direct_roots(vm: KvmState, as_id: int) -> list[Root]:
    return vm.mmu.roots_of(as_id, RootRole.DIRECT)


def split_huge(vm: KvmState, root: Root, start: int, end: int) -> int:
    """Eager page split: every huge leaf in [start, end) becomes a table of smaller leaves with
    the same attributes (W and D kept). Returns the huge leaves split. Like the kernel's,
    splitting just stops when no table can be allocated (kvm-memslots.md §3.4 b): here, when
    the page-table budget is spent. Work is per parent table: the children's entries are
    built in one numpy operation."""
    split = 0
    for level in (3, 2):
        for cur, sl, idx in list(vm.mmu.leaf_iter(root, start, end, min_level=2)):
            if cur.level != level:
                continue
            huge = idx[(sl[idx] & S.U_PS) != 0]
            room = max(0, vm.table_budget - vm.mmu.pool.live)
            n = _split_table(vm, root, cur, huge[:room])
            split += n
            if n < len(huge):
                # The allocation that failed is traced with its errno (tdp_mmu.c).
                i = cur.lo + int(huge[n])
                e = int(vm.mmu.pool.entries(cur.table)[i])
                vm.mmu.trace.append(Kind.SPLIT_HUGE_PAGE, cur.gfn(i), level, e, c=-errno.ENOMEM)
                return split
    return split


def split_tables_needed(vm: KvmState, as_id: int, start: int, end: int) -> int:
    """The most page tables `split_huge` may allocate over [start, end) of the address
    space's direct roots: one per 2 MiB leaf, 513 per 1 GiB leaf (split twice). Walks the
    tables above the leaf level only; the service reserves this before an eager split."""
    need = 0
    for root in _direct_roots(vm, as_id):
        for cur in walk(vm.mmu.pool, root.table, start, end, min_level=2):
            if cur.level not in (2, 3):
                continue
            sl = vm.mmu.pool.entries(cur.table)[cur.lo : cur.hi]
            huge = int(np.count_nonzero((sl & S.U_PRESENT != 0) & (sl & S.U_PS != 0)))
            need += huge * (1 if cur.level == 2 else 1 + 512)
    return need


def _split_table(vm: KvmState, root: Root, cur: Cursor, huge: np.ndarray) -> int:
    """Split the huge leaves at `huge` (indexes into the cursor's slice) of one table, as a
    fault splits one (Mmu.split_leaf: tdp_mmu_split_huge_page)."""
    idx = cur.lo + huge.astype(np.int64)
    if vm.mmu.bulk and len(idx):
        vm.mmu.split_leaves(root, cur.table, idx, cur.level)
    else:  # the general path, one leaf at a time (the property tests compare the two)
        for i in idx.tolist():
            vm.mmu.split_leaf(root, cur.table, i, cur.level)
    return len(huge)


def write_protect(
    vm: KvmState,
    root: Root,
    start: int,
    end: int,
    mask: np.ndarray | None = None,
    base: int = 0,
    min_level: int = 1,
    max_level: int = 3,
) -> int:
    """Clear W on leaves in [start, end) (MMU-writable stays: the fast path may restore W).
    With `mask`, only GFNs whose bit is set (mask indexed by gfn - base); leaves below
    `min_level` or above `max_level` are left alone. Each change is traced."""
    return _clear_leaf_bit(vm, root, start, end, S.U_W, mask, base, min_level, max_level, True)


def clear_dirty_bits(
    vm: KvmState, root: Root, start: int, end: int, mask: np.ndarray | None = None, base: int = 0
) -> int:
    """PML (host.enable_pml): clear D on leaves in [start, end) so the CPU logs the next write
    (kvm_tdp_mmu_clear_dirty_slot; with `mask`, 4K leaves only, as
    kvm_tdp_mmu_clear_dirty_pt_masked). The leaves stay writable: no fault."""
    top = 1 if mask is not None else 3
    return _clear_leaf_bit(vm, root, start, end, S.U_D, mask, base, 1, top, False)


def _clear_leaf_bit(
    vm: KvmState,
    root: Root,
    start: int,
    end: int,
    bit: np.uint64,
    mask: np.ndarray | None,
    base: int,
    min_level: int,
    max_level: int,
    traced: bool,
) -> int:
    """Clear `bit` on the present leaves in [start, end) of levels [min_level, max_level]
    that have it (with `mask`, only GFNs whose bit is set, indexed by gfn - base); returns
    how many. Whole leaf tables go a level-2 table at a time."""
    n = 0
    for blk in vm.mmu.leaf_blocks(root, start, end, min_level):
        if blk.level > max_level:
            continue
        ent = vm.mmu.pool.read_rows(blk.rows)
        sl = ent[:, blk.lo : blk.hi]
        leaf = _leaves(sl, blk.level)
        if mask is not None:
            leaf[leaf] = mask[blk.gfns()[leaf] - base]
        hit = leaf & ((sl & bit) != 0)
        k = int(np.count_nonzero(hit))
        if k:
            if traced and vm.mmu.trace.enabled:
                gfns = blk.gfns()[hit].astype(np.uint64)
                vm.mmu.trace.spte_changed(root.as_id, gfns, blk.level, sl[hit], sl[hit] & ~bit)
            sl[hit] &= ~bit
            vm.mmu.pool.write_rows(blk.rows, ent)
            n += k
    return n


def _leaves(sl: np.ndarray, level: int) -> np.ndarray:
    """Which of the entries `sl` of tables at `level` are present leaves."""
    leaf: np.ndarray = (sl & S.U_PRESENT) != 0
    if level > 1:
        leaf &= (sl & S.U_PS) != 0
    return leaf


def rearm(vm: KvmState, root: Root, s: Memslot, mask: np.ndarray) -> int:
    """kvm_arch_mmu_enable_log_dirty_pt_masked: with KVM_DIRTY_LOG_INITIALLY_SET the huge
    leaves over each 64-page word's first and last page are write-protected, PML or not, so
    the next write splits them (engine revision 3; before it, PML left them writable and
    their writes unlogged); then the masked pages: clear D with PML, else write-protect
    (revision 3: 4K leaves only, as kvm_tdp_mmu_clear_dirty_pt_masked)."""
    wp, rev3 = 0, vm.engine_rev >= 3
    if rev3 and vm.manual_dirty_log & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
        for gfn in _word_ends(mask, s.base_gfn):
            wp += protect_huge_gfn(vm, root, gfn)
    if vm.host_profile.enable_pml:
        clear_dirty_bits(vm, root, s.base_gfn, s.end_gfn, mask, s.base_gfn)
        return wp
    top = 1 if rev3 else 3
    return wp + write_protect(vm, root, s.base_gfn, s.end_gfn, mask, s.base_gfn, max_level=top)


def _word_ends(mask: np.ndarray, base_gfn: int) -> list[int]:
    """Per 64-page word with bits set, its first and last set page as GFNs (the second only
    when it lies in another 2 MiB region, as the kernel checks with ALIGN)."""
    first, last = _first_last_per_word(mask)
    out: list[int] = []
    for a, b in zip((base_gfn + first).tolist(), (base_gfn + last).tolist(), strict=True):
        out.append(a)
        if -(-a // 512) != -(-b // 512):  # ALIGN(start, PMD_SIZE) != ALIGN(end, PMD_SIZE)
            out.append(b)
    return out


def _first_last_per_word(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each 64-page word of `mask` with bits set (__ffs / __fls of the kernel's words),
    the index of its first and of its last set page."""
    words = -(-len(mask) // 64)
    padded = np.zeros(words * 64, dtype=bool)
    padded[: len(mask)] = mask
    grid = padded.reshape(words, 64)
    rows = np.flatnonzero(grid.any(axis=1))
    first = rows * 64 + np.argmax(grid[rows], axis=1)
    last = rows * 64 + 63 - np.argmax(grid[rows, ::-1], axis=1)
    return first, last


def protect_huge_gfn(vm: KvmState, root: Root, gfn: int) -> int:
    """kvm_mmu_slot_gfn_write_protect(…, PG_LEVEL_2M) → write_protect_gfn: a huge leaf over
    `gfn` loses W and MMU-writable, so a write faults and the fast path cannot restore W.
    Returns 1 if it changed."""
    table, i, level, e = vm.mmu.lookup(root, gfn)
    if level < 2 or not e & S.SPTE_MMU_PRESENT or not e & S.EPT_PS:
        return 0
    new = e & ~(S.EPT_W | S.EPT_MMU_WRITABLE)
    if new == e:
        return 0
    head = gfn & ~(span(level) - 1)
    vm.mmu.trace.spte_changed(root.as_id, head, level, e, new)
    vm.mmu.pool.entries(table)[i] = np.uint64(new)
    return 1


def apply_flags(vm: KvmState, old: Memslot, new: Memslot) -> dict[str, Any] | None:
    """kvm_mmu_slot_apply_flags for a FLAGS_ONLY change."""
    key = (new.as_id, new.id)
    logging_old = bool(old.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES)
    logging_new = bool(new.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES)
    if not logging_new:
        vm.free_dirty(key)  # the bitmap goes whenever logging is off (§2.3)
    if logging_old == logging_new or new.flags & uapi.KVM_MEM_READONLY:
        if logging_new and key not in vm.dirty:
            vm.alloc_dirty(new)
        return None
    t0 = time.perf_counter()
    acc = ZapAcc()
    if logging_new:
        vm.alloc_dirty(new)
        if vm.manual_dirty_log & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
            return None  # protection happens later, on KVM_CLEAR_DIRTY_LOG
        split = wp = 0
        host = vm.host_profile
        for root in _direct_roots(vm, new.as_id):
            if host.eager_page_split:
                split += split_huge(vm, root, new.base_gfn, new.end_gfn)
            if host.enable_pml:
                # kvm_mmu_slot_apply_flags with PML: clear D on the leaves, write-protect
                # only the huge ones (they must split before 4K writes can be logged).
                clear_dirty_bits(vm, root, new.base_gfn, new.end_gfn)
                wp += write_protect(vm, root, new.base_gfn, new.end_gfn, min_level=2)
            else:
                wp += write_protect(vm, root, new.base_gfn, new.end_gfn)
        return finish(
            vm,
            acc,
            "dirty_log",
            "enable_dirty_logging",
            (new.base_gfn, new.end_gfn),
            t0,
            flush=True,  # unconditional on enable (§3.4 d)
            trigger=new,
            huge_pages_split=split,
            sptes_write_protected=wp,
        )
    recovered = 0
    for root in _direct_roots(vm, new.as_id):
        recovered += recover_huge_pages(vm, root, new, acc)
    return finish(
        vm,
        acc,
        "dirty_log",
        "recover_huge_pages",
        (new.base_gfn, new.end_gfn),
        t0,
        flush=recovered > 0,
        trigger=new,
        huge_pages_recovered=recovered,
    )


def recover_huge_pages(vm: KvmState, root: Root, slot: Memslot, acc: ZapAcc) -> int:
    """kvm_tdp_mmu_recover_huge_pages: a table fully inside the slot whose GFNs may now be
    mapped at its parent's level is replaced by one huge leaf (2M first, then 1G)."""
    mmu = vm.mmu
    fp = FaultPath(vm, next(iter(vm.vcpus.values())) if vm.vcpus else None, "read")  # type: ignore[arg-type]
    recovered = 0
    for level in (2, 3):
        if level == 2 and mmu.bulk and not vm.has_private_mem:
            recovered += _recover_leaf_tables(vm, fp, root, slot, acc)
            continue
        n = span(level)
        for cur, sl, idx in list(mmu.leaf_iter(root, slot.base_gfn, slot.end_gfn)):
            if cur.level != level - 1:
                continue
            region = cur.base & ~(n - 1)
            if region < slot.base_gfn or region + n > slot.end_gfn:
                continue
            if fp.max_level(slot, region, False) < level:
                continue
            # Host pages discarded there are not a huge page the host maps (still PTE-mapped).
            hva = hva_to_hpn(slot.hva(region))
            if len(vm.host.freed) and vm.host.freed.overlap(hva, hva + n):
                continue
            first = int(sl[idx[0]])
            at = mmu.entry_at(root, region, level)
            if at is None:
                continue
            parent, i = at
            if S.pfn_of(int(mmu.pool.entries(parent)[i])) != mmu.pool.pfn(cur.table):
                continue
            huge = (first & ~S.SPTE_BASE_ADDR_MASK) | S.EPT_PS
            pfn = (S.pfn_of(first) - (int(idx[0]) + cur.lo) * span(level - 1)) & ~(n - 1)
            leaf = huge | (pfn << S.PFN_SHIFT)
            mmu.replace_table(root, parent, i, leaf, acc)
            mmu.set_leaves(root, parent, i, np.array([leaf], dtype=np.uint64), level)
            recovered += 1
    # Collapsing is not a loss of mapping: nothing to refault.
    acc.runs.clear()
    acc.leaves.clear()
    return recovered


def _recover_leaf_tables(
    vm: KvmState, fp: FaultPath, root: Root, slot: Memslot, acc: ZapAcc
) -> int:
    """The 2M pass of `recover_huge_pages` a level-2 table at a time: its leaf tables that
    qualify are found and replaced in one numpy pass each (the same tables, leaves, trace
    records and counts as the per-table loop, which VMs with private memory keep)."""
    recovered = 0
    for cur in list(walk(vm.mmu.pool, root.table, slot.base_gfn, slot.end_gfn, min_level=2)):
        if cur.level == 2:
            recovered += _recover_table(vm, fp, root, slot, cur, acc)
    return recovered


def _recover_table(
    vm: KvmState, fp: FaultPath, root: Root, slot: Memslot, cur: Cursor, acc: ZapAcc
) -> int:
    """The leaf tables of the level-2 table at `cur` that become 2 MiB leaves: wholly inside
    the slot, on a whole host huge page none of whose pages is freed, with a present leaf;
    each leaf is the table's first present leaf made huge over its 2 MiB-aligned PFN."""
    pool = vm.mmu.pool
    sl = pool.entries(cur.table)[cur.lo : cur.hi]
    pos = cur.lo + np.flatnonzero(((sl & S.U_PRESENT) != 0) & ((sl & S.U_PS) == 0))
    bases = cur.base + pos * ENTRIES
    ok = fp.maps_2m(slot, bases)
    # Host pages discarded there are not a huge page the host maps (still PTE-mapped).
    ok &= ~vm.host.freed.overlaps(
        hva_to_hpn(slot.userspace_addr) + (bases - slot.base_gfn), ENTRIES
    )
    pos = pos[ok]
    old = pool.read_rows(TablePool.children(pool.entries(cur.table)[pos]))
    present = (old & S.U_PRESENT) != 0
    has = present.any(axis=1)
    if not has.all():
        pos, old, present = pos[has], old[has], present[has]
    if not len(pos):
        return 0
    i = np.argmax(present, axis=1)
    first = old[np.arange(len(pos)), i]
    pfn = (((first & S.U_ADDR) >> S.U_SHIFT).astype(np.int64) - i) & ~(ENTRIES - 1)
    leaves = (first & ~S.U_ADDR) | S.U_PS | (pfn.astype(np.uint64) << S.U_SHIFT)
    vm.mmu.replace_leaf_tables(root, cur.table, pos, old, leaves, acc)
    return len(pos)


def _logging_slot(vm: KvmState, slot: object) -> tuple[Memslot, np.ndarray]:
    """The slot and its bitmap: no slot, or no dirty bitmap → ENOENT (kvm_get_dirty_log)."""
    s = vm.lookup_slot(slot)
    bm = vm.dirty.get((s.as_id, s.id))
    if bm is None:
        raise KvmError(errno.ENOENT, f"memslot {slot:#x} does not log dirty pages")
    return s, bm


def _pack(bits: np.ndarray) -> tuple[str, int]:
    """The kernel's bitmap: little-endian u64 words, bit i = page i."""
    words = -(-len(bits) // 64)
    padded = np.zeros(words * 64, dtype=bool)
    padded[: len(bits)] = bits
    raw = np.packbits(padded, bitorder="little").tobytes()
    return base64.b64encode(raw).decode(), int(np.count_nonzero(bits))


def get_dirty_log(vm: KvmState, slot: object) -> dict[str, Any]:
    """KVM_GET_DIRTY_LOG: without manual protect it is destructive and re-arms protection
    (kvm-memslots.md §5.3; kvm_get_dirty_log_protect)."""
    s, bm = _logging_slot(vm, slot)
    bitmap, count = _pack(bm)
    out: dict[str, object] = {
        "first_page": 0,
        "num_pages": s.npages,
        "bitmap": bitmap,
        "dirty_count": count,
    }
    if vm.manual_dirty_log & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE or not count:
        return out
    harvested = bm.copy()
    bm[:] = False
    wp = 0
    for root in _direct_roots(vm, s.as_id):
        wp += rearm(vm, root, s, harvested)
    flush_tlbs(vm)
    out["sptes_write_protected"] = wp
    return out


def clear_dirty_log(
    vm: KvmState, slot: object, first_page: object, num_pages: object, bitmap: object
) -> dict[str, Any]:
    """KVM_CLEAR_DIRTY_LOG: clear the given bits and protect those pages. The kernel does not
    require manual protect for it (kvm_clear_dirty_log_protect has no such check)."""
    s, bm, first, n = _clear_range(vm, slot, first_page, num_pages)
    mask = _clear_mask(bitmap, bm, first, n)
    if not mask.any():
        return {"cleared": 0}
    bm[mask] = False
    wp = 0
    spans = _word_spans(mask) if vm.manual_dirty_log & uapi.KVM_DIRTY_LOG_INITIALLY_SET else []
    for root in _direct_roots(vm, s.as_id):
        if vm.host_profile.eager_page_split:
            for a, b in spans:
                split_huge(vm, root, s.base_gfn + a, s.base_gfn + b)
        wp += rearm(vm, root, s, mask)
    flush_tlbs(vm)
    return {"cleared": int(np.count_nonzero(mask)), "sptes_write_protected": wp}


def _clear_range(
    vm: KvmState, slot: object, first_page: object, num_pages: object
) -> tuple[Memslot, np.ndarray, int, int]:
    """kvm_clear_dirty_log_protect's checks, in its order (each EINVAL but the lookup's
    ENOENT): u64 arguments, slot id range, first_page alignment, the logging slot, num_pages
    alignment unless the range ends the slot, a range beyond the slot. Returns the slot, its
    bitmap, first_page and num_pages."""
    first, n = _u64_pages(first_page, num_pages)
    _check_slot_id(vm, slot)
    if first & 63:
        raise einval("first_page must be a multiple of 64")
    s, bm = _logging_slot(vm, slot)
    if n & 63 and first + n != s.npages:
        raise einval("num_pages must be a multiple of 64 unless the range ends the slot")
    if first > s.npages or n > s.npages - first:
        raise einval("range beyond the slot")
    return s, bm, first, n


def _u64_pages(first_page: object, num_pages: object) -> tuple[int, int]:
    """first_page and num_pages as the kernel's __u64 fields (JSON can say anything)."""
    for name, v in (("first_page", first_page), ("num_pages", num_pages)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= uapi.U64_MASK:
            raise einval(f"{name} must be a u64")
    return int(first_page), int(num_pages)  # type: ignore[call-overload]


def _check_slot_id(vm: KvmState, slot: object) -> None:
    """The address space and id range of a u32 slot, checked before first_page's alignment
    (kvm_clear_dirty_log_protect); anything else is left to the slot lookup."""
    if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot <= 0xFFFFFFFF:
        if slot >> 16 >= vm.nr_as or slot & 0xFFFF >= uapi.KVM_USER_MEM_SLOTS:
            raise einval(f"slot {slot:#x}: address space or id out of range")


def _clear_mask(bitmap: object, bm: np.ndarray, first: int, n: int) -> np.ndarray:
    """The pages to clear, over the whole slot: the first `n` bits of `bitmap` (base64 of the
    kernel's little-endian words) placed at `first`, where the slot's bitmap `bm` has them."""
    try:
        raw = base64.b64decode(str(bitmap), validate=True)
    except ValueError:
        raise einval("bitmap is not base64") from None
    if len(raw) * 8 < n:
        raise einval("bitmap shorter than num_pages")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:n].astype(bool)
    mask = np.zeros(len(bm), dtype=bool)
    mask[first : first + n] = bits & bm[first : first + n]
    return mask


def _word_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """Per 64-page word with bits set, [first set, last set] (what the kernel splits with
    INITIALLY_SET: kvm_arch_mmu_enable_log_dirty_pt_masked), touching spans merged."""
    first, last = _first_last_per_word(mask)
    spans: list[tuple[int, int]] = []
    for a, b in zip(first.tolist(), (last + 1).tolist(), strict=True):
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


@operation("get_dirty_log")
class GetDirtyLog(Op):
    """KVM_GET_DIRTY_LOG."""

    slot: int


@operation("clear_dirty_log")
class ClearDirtyLog(Op):
    """KVM_CLEAR_DIRTY_LOG (bitmap as hex or base64, as the API gives it)."""

    slot: int
    first_page: int
    num_pages: int
    bitmap: str
