"""Zapping: the fast zap of every root, the slot's leaves, a GFN range, and teardown.

Each returns the zap event it recorded (cause, path, GFN range, SPTEs by root and level,
tables freed, roots invalidated, flushes, kicks), which is also appended to the VM's list.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any, TypedDict

from .addr import gpa_to_gfn, hva_to_hpn, size_to_pages, strip_shared
from .errors import KvmError, check_u64, einval
from .op import Op, operation
from .paging import walk
from .roots import Root, RootRole, ZapAcc
from .trace import Kind
from .uapi import PAGE_SIZE, VmType

if TYPE_CHECKING:
    from .gmem import GmemFile
    from .memslots import Memslot
    from .state import KvmState

MAX_EVENTS = 10000
# Counts only some paths produce; every event carries them all (0 where they do not apply).
EVENT_EXTRAS = ("huge_pages_split", "sptes_write_protected", "huge_pages_recovered")
# An event names its VM type; `VmType.name` goes through the enum machinery each time.
_VM_TYPE_NAMES = {t: t.name for t in VmType}
# Enum members the memslot zap path names on every call, as module constants: naming one on
# its class is a descriptor call (~0.15 µs in 3.11).
_DEFAULT_VM = int(VmType.KVM_X86_DEFAULT_VM)
_DIRECT = RootRole.DIRECT
_ZAP_ALL_FAST = Kind.ZAP_ALL_FAST
_NOTHING = ZapAcc()  # what a zap that found no root took: read, never added to


class ZapEvent(TypedDict):
    """One zap, in the fixed shape of docs/engine.md "Zap events" (the key order is the
    answer's). A plain dict at run time: the VM's log and every answer hold it as is; `record`
    fills in a copy of `_EVENT_SHAPE`, these keys in this order."""

    seq: int
    at: float
    cause: str
    path: str
    vm_type: str
    slot_zap_all: bool
    as_id: int | None
    slot: int | None
    gfn_start: int
    gfn_end: int
    sptes_zapped: dict[str, Any]
    sptes_zapped_total: int
    tables_freed: int
    roots_invalidated: int
    tlb_flushes: int
    vcpu_kicks: int
    duration_us: int
    huge_pages_split: int
    sptes_write_protected: int
    huge_pages_recovered: int


# Every zap event's keys in ZapEvent's order, each 0 (the optional counts stay 0 unless given).
_EVENT_SHAPE: dict[str, Any] = dict.fromkeys(ZapEvent.__annotations__, 0)


def flush_memslot(vm: KvmState, slot: Memslot, cause: str) -> dict[str, Any]:
    """kvm_arch_flush_shadow_memslot: the SLOT_ZAP_ALL quirk decides (kvm-memslots.md §4.1)."""
    if vm.zap_policy == "zap_all_shared_only":
        return zap_all_fast(vm, cause, slot, experiment=True)
    if slot_zap_all(vm):
        return zap_all_fast(vm, cause, slot)
    return zap_slot_leafs(vm, slot, cause)


def slot_zap_all(vm: KvmState) -> bool:
    """Whether KVM_X86_QUIRK_SLOT_ZAP_ALL is in force: enabled, and the VM is a default VM."""
    return vm.vm_type == _DEFAULT_VM and vm.quirk_zap_all


def running_vcpus(vm: KvmState) -> int:
    return len([v for v in vm.vcpus.values() if v.running])


def flush_tlbs(vm: KvmState) -> int:
    """kvm_flush_remote_tlbs: a request always; an IPI only if a vCPU is in the guest."""
    vm.stats_kvm["remote_tlb_flush_requests"] += 1
    if running_vcpus(vm):
        vm.stats_kvm["remote_tlb_flush"] += 1
    # A TD's flush is an INVEPT of the shared EPT (tdx_flush_tlb_all); TDH.MEM.TRACK happens
    # only per private page removed, in TdxState.remove_leaves.
    return 1


def zap_all_fast(
    vm: KvmState, cause: str, slot: Memslot | None = None, experiment: bool = False
) -> dict[str, Any]:
    """kvm_mmu_zap_all_fast: invalidate every direct root; vCPUs load new ones
    (kvm-memslots.md §4.3, §5).

    Mirror roots are never touched. With only the TDP MMU there is no remote flush: each
    vCPU flushes locally when it switches to its new root.
    """
    t0 = time.perf_counter()
    mmu = vm.mmu
    # Traced before the generation flips; the TDP MMU uses no shadow pages (used_pages 0).
    mmu.trace.append(_ZAP_ALL_FAST, c=mmu.mmu_valid_gen, n=1)
    mmu.mmu_valid_gen ^= 1
    direct = [r for r in mmu.roots.values() if r.role is _DIRECT]  # in id order
    invalidated = 0
    for root in direct:
        if root.valid:
            root.valid = False
            invalidated += 1
    # Every direct root is obsolete now: each is freed. With none, the zap took nothing.
    acc = ZapAcc() if direct else _NOTHING
    for root in direct:
        mmu.free_root(root, acc)
    kicks = running_vcpus(vm)  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS to every vCPU
    # vCPUs keep naming their obsolete root until their next entry reloads it.
    vm.stats_extra["zaps_all_fast"] += 1
    path = "zap_all_fast_shared_only" if experiment else "zap_all_fast"
    # Every root of every address space goes: the event covers the whole GFN space.
    return record(vm, cause, path, 0, vm.max_gfn + 1, acc, invalidated, 0, kicks, t0, trigger=slot)


def zap_slot_leafs(vm: KvmState, slot: Memslot, cause: str) -> dict[str, Any]:
    """kvm_tdp_mmu_unmap_gfn_range over the slot: every root of its address space, valid or
    not, direct and mirror; leaves only; one flush if a valid root lost something
    (kvm-memslots.md §4.4)."""
    t0 = time.perf_counter()
    acc = ZapAcc()
    flush = False
    for root in vm.mmu.roots_of(slot.as_id):
        flush |= zap_root_range(vm, root, slot.base_gfn, slot.end_gfn, acc)
    vm.stats_extra["zaps_slot_leafs"] += 1
    span = (slot.base_gfn, slot.end_gfn)
    return finish(vm, acc, cause, "zap_slot_leafs", span, t0, flush=flush, trigger=slot)


def zap_root_range(vm: KvmState, root: Root, start: int, end: int, acc: ZapAcc) -> bool:
    """Zap the leaves of [start, end) in one root; returns whether a TLB flush is needed
    (a valid root lost a present SPTE), as kvm_tdp_mmu_zap_leafs does."""
    before_flush, acc.flush = acc.flush, False
    if root.role is RootRole.DIRECT:
        bits = vm.gfn_direct_bits
        vm.mmu.zap_range(root, start | bits, end | bits, acc, leafs_only=True)
    else:
        before = len(acc.runs)
        vm.mmu.zap_range(root, start, end, acc, leafs_only=True)
        assert vm.tdx is not None
        for s, e, _ in acc.runs[before:]:
            vm.tdx.remove_leaves(s, e - s)
    flush = acc.flush
    acc.flush = before_flush or flush
    return flush


def zap_gfn_range(
    vm: KvmState,
    as_ids: list[int],
    start: int,
    end: int,
    roles: set[RootRole],
    cause: str,
    path: str,
) -> dict[str, Any]:
    """kvm_unmap_gfn_range for notifier, attribute and guest_memfd invalidations."""
    return zap_gfn_ranges(vm, [(a, start, end) for a in as_ids], roles, cause, path)


def zap_gfn_ranges(
    vm: KvmState, ranges: list[tuple[int, int, int]], roles: set[RootRole], cause: str, path: str
) -> dict[str, Any]:
    """Several (as_id, start, end) ranges as one invalidation: one flush if anything went,
    one event (what a guest_memfd invalidation over several bindings does)."""
    t0 = time.perf_counter()
    acc = ZapAcc()
    flush = False
    for as_id, s, e in ranges:
        for root in vm.mmu.roots_of(as_id):
            if root.role in roles:
                flush |= zap_root_range(vm, root, s, e, acc)
    span = (min(s for _, s, _ in ranges), max(e for _, _, e in ranges))
    return finish(vm, acc, cause, path, span, t0, flush=flush)


def finish(
    vm: KvmState,
    acc: ZapAcc,
    cause: str,
    path: str,
    span: tuple[int, int],
    t0: float,
    *,
    flush: bool,
    trigger: Memslot | None = None,
    **extra: int,
) -> dict[str, Any]:
    """The one place a zap that may need a TLB flush ends: the flush (and the IPIs it sends
    to running vCPUs) when the primitives said one is needed, then the zap event."""
    flushes = flush_tlbs(vm) if flush else 0
    kicks = running_vcpus(vm) if flushes else 0
    return record(vm, cause, path, span[0], span[1], acc, 0, flushes, kicks, t0, trigger, **extra)


def measured_duration(vm: KvmState, t0: float) -> int:
    """Wall-clock time of a zap; on replay, the time measured when the call first ran."""
    journaled = vm.replay_durations
    d = journaled.pop(0) if journaled else int((time.perf_counter() - t0) * 1e6)
    vm.last_durations.append(d)
    return d


def record(
    vm: KvmState,
    cause: str,
    path: str,
    gfn_start: int,
    gfn_end: int,
    acc: ZapAcc,
    invalidated: int,
    flushes: int,
    kicks: int,
    t0: float,
    trigger: Memslot | None = None,
    **extra: int,
) -> dict[str, Any]:
    """Append the zap event to the VM's log; the caller gets its own copy.

    Every event has one shape (docs/engine.md, "Zap events"): both root roles and every
    level in `sptes_zapped`, the VM type and SLOT_ZAP_ALL state the path was chosen from,
    the memslot that triggered it (if one did), and every optional count (0 when unused).
    """
    if acc.runs:
        _note_zapped(vm, acc)
    total = acc.total() if acc.leaves else 0
    vm.stats_extra["zaps_total_sptes"] += total
    vm.event_seq = seq = vm.event_seq + 1
    event = _EVENT_SHAPE.copy()  # a copy and 17 stores cost half the 20-key literal
    event["seq"] = seq
    event["at"] = vm.now
    event["cause"] = cause
    event["path"] = path
    event["vm_type"] = _VM_TYPE_NAMES[vm.vm_type]
    event["slot_zap_all"] = slot_zap_all(vm)
    event["as_id"] = None if trigger is None else trigger.as_id
    event["slot"] = None if trigger is None else trigger.id
    event["gfn_start"] = gfn_start
    event["gfn_end"] = gfn_end
    event["sptes_zapped"] = _sptes_zapped(acc)
    event["sptes_zapped_total"] = total
    event["tables_freed"] = acc.tables_freed
    event["roots_invalidated"] = invalidated
    event["tlb_flushes"] = flushes
    event["vcpu_kicks"] = kicks
    event["duration_us"] = measured_duration(vm, t0)
    if extra:
        unknown = set(extra) - set(EVENT_EXTRAS)
        assert not unknown, f"zap event fields outside the fixed shape: {unknown}"
        event.update(extra)
    vm.events.append(event)
    if len(vm.events) > MAX_EVENTS:
        del vm.events[: len(vm.events) - MAX_EVENTS]
    if not vm.answering:  # the caller discards the answer (replay)
        return event
    # The caller's own copy: the event is flat but for `sptes_zapped`, built afresh.
    own = event.copy()
    own["sptes_zapped"] = _sptes_zapped(acc)
    return own


def _note_zapped(vm: KvmState, acc: ZapAcc) -> None:
    """The GFNs the zap's runs cover go to `vm.zapped` (either alias of a TD's GFN as one)."""
    bits = vm.gfn_direct_bits
    vm.zapped.add_many(
        [(s & ~bits, ((e - 1) & ~bits) + 1) if s & bits else (s, e) for s, e, _ in acc.runs]
    )


def _sptes_zapped(acc: ZapAcc) -> dict[str, Any]:
    """A new `sptes_zapped` dict of the zap (every role and level, zeros included)."""
    return acc.by_level() if acc.leaves else _no_sptes()


def _no_sptes() -> dict[str, Any]:
    """`sptes_zapped` of a zap that took no leaf (`ZapAcc.by_level` of an empty zap)."""
    return {"direct": _NO_LEVELS.copy(), "mirror": _NO_LEVELS.copy(), "4k": 0, "2m": 0, "1g": 0}


_NO_LEVELS = {"4k": 0, "2m": 0, "1g": 0}  # copied, never handed out


def account_fault_zaps(vm: KvmState, acc: ZapAcc) -> None:
    """What a fault zapped on its way (a huge leaf split into a table may refault; a table
    replaced by a huge leaf is remapped at once) and the flush that replacing a present SPTE
    needs."""
    for s, e, _ in acc.runs:
        vm.zapped.add(s & ~vm.gfn_direct_bits, ((e - 1) & ~vm.gfn_direct_bits) + 1)
    if acc.flush:
        flush_tlbs(vm)


def explicit_zap(vm: KvmState, op: ExplicitZap) -> dict[str, Any]:
    scope, gpa, size, roots = op.scope, op.gpa, op.size, op.roots
    if scope not in ("all", "range") or roots not in ("shared", "private", "both"):
        raise einval("scope must be all|range and roots shared|private|both")
    # vkmmu's rule (api-contract.md): KVM never zaps a live TD's mirror root
    # (kvm-private-tdx.md §5.4 rule 2), so a diagnostic "zap all" of it is refused.
    if roots in ("private", "both") and vm.is_tdx and scope == "all":
        raise KvmError(errno.EPERM, "the private (mirror) root of a live TD is never zapped")
    if scope == "all":
        if roots == "private" and not vm.is_tdx:
            raise einval("this VM has no private (mirror) root")
        return zap_all_fast(vm, "explicit")
    start, end = _explicit_range(vm, gpa, size)
    vm.stats_extra["zaps_range"] += 1
    sel = _explicit_roles(vm, roots)
    return zap_gfn_range(vm, list(range(vm.nr_as)), start, end, sel, "explicit", "zap_gfn_range")


def recover_nx_huge_pages(vm: KvmState, op: RecoverNxHugePages) -> dict[str, Any]:
    """One run of the NX huge page recovery worker (kvm_recover_nx_huge_pages): of the
    possible NX huge pages, oldest first, ceil(n / ratio) go; one on a slot with dirty
    logging is only unaccounted, the others' 4K leaves are zapped so that the next non-exec
    fault maps the region huge again. Ratio 0 (recovery off) zaps nothing."""
    ratio = check_u64(op.ratio, "ratio")
    todo = -(-len(vm.nx_huge_pages) // ratio) if ratio else 0
    taken, vm.nx_huge_pages = vm.nx_huge_pages[:todo], vm.nx_huge_pages[todo:]
    vm.stats_kvm["nx_lpage_splits"] = len(vm.nx_huge_pages)
    ranges = []
    for as_id, gfn in taken:
        slot = vm.spaces[as_id].find(gfn)
        if slot is not None and (as_id, slot.id) in vm.dirty:
            continue  # unaccount_nx_huge_page only
        ranges.append((as_id, gfn, gfn + 512))
    zap = None
    if ranges:
        zap = zap_gfn_ranges(vm, ranges, {RootRole.DIRECT}, "nx_recovery", "recover_nx_huge_pages")
    return {"recovered": len(taken), "remaining": len(vm.nx_huge_pages), "zap": zap}


def _explicit_range(vm: KvmState, gpa: object, size: object) -> tuple[int, int]:
    """The GFN range of an explicit range zap (either alias of a TD's GPA names the same)."""
    g = check_u64(gpa, "gpa")
    n = check_u64(size, "size")
    if n == 0 or g & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1) or g + n > vm.gpa_limit:
        raise einval("gpa/size must be page aligned, non-empty, inside the GPA space")
    start = strip_shared(gpa_to_gfn(g), vm.gfn_direct_bits)
    return start, start + size_to_pages(n)


def _explicit_roles(vm: KvmState, roots: str) -> set[RootRole]:
    if vm.is_tdx and roots == "shared":
        return {RootRole.DIRECT}
    if vm.is_tdx and roots == "private":
        return {RootRole.MIRROR}
    return {RootRole.DIRECT, RootRole.MIRROR}


def notifier_invalidate(vm: KvmState, first: int, end: int) -> dict[str, Any] | None:
    """kvm_mmu_notifier_invalidate_range_start: every slot whose HVA range intersects,
    shared (direct) roots only — host mm events never touch TDX mirror roots
    (kvm-private-tdx.md §3.6). guest_memfd-only slots included: every memslot is in the HVA
    tree the notifier walks (kvm_replace_memslot, kvm_handle_hva_range); the guest refaults
    from guest_memfd."""
    zap = None
    t0 = time.perf_counter()
    acc = ZapAcc()
    lo_gfn, hi_gfn = None, None
    flush = False
    for space in vm.spaces:
        for slot in space.by_gfn():
            s_first = hva_to_hpn(slot.userspace_addr)
            s_end = s_first + slot.npages
            lo, hi = max(first, s_first), min(end, s_end)
            if lo >= hi:
                continue
            g0 = slot.base_gfn + (lo - s_first)
            g1 = slot.base_gfn + (hi - s_first)
            for root in vm.mmu.roots_of(space.as_id, RootRole.DIRECT):
                flush |= zap_root_range(vm, root, g0, g1, acc)
            lo_gfn = g0 if lo_gfn is None else min(lo_gfn, g0)
            hi_gfn = g1 if hi_gfn is None else max(hi_gfn, g1)
    if lo_gfn is not None:
        vm.stats_extra["zaps_notifier"] += 1
        span = (lo_gfn, hi_gfn or 0)
        zap = finish(vm, acc, "mmu_notifier", "zap_gfn_range", span, t0, flush=flush)
    return zap


def gmem_invalidate(
    vm: KvmState, file: GmemFile, first: int, end: int, cause: str
) -> dict[str, Any] | None:
    """kvm_gmem_invalidate: zap the private mappings of every slot bound to the range, as
    one invalidation (the flush flag is ORed over the bindings: one flush, one event)."""
    ranges = []
    for start, n, key in file.bindings_in(first, end):
        slot = vm.spaces[key[0]].get(key[1])
        if slot is not None:
            g0 = slot.base_gfn + (start - slot.gmem_pgoff)
            ranges.append((key[0], g0, g0 + n))
    if not ranges:
        return None
    roles = {RootRole.MIRROR} if vm.is_tdx else {RootRole.DIRECT}
    return zap_gfn_ranges(vm, ranges, roles, cause, "zap_gfn_range")


def destroy(vm: KvmState) -> dict[str, Any]:
    """VM destruction: HKID released first for a TD, then every root torn down, leaves before
    S-EPT tables, pages reclaimed (kvm-private-tdx.md §5.1 teardown, §5.3, §5.4 rule 1)."""
    t0 = time.perf_counter()
    acc = ZapAcc()
    if vm.tdx is not None:
        vm.tdx.hkid_assigned = False
    for root in vm.mmu.roots_of():
        root.valid = False
        before = len(acc.runs)
        sept = []
        if root.role is RootRole.MIRROR:
            # Every S-EPT table but the root (the TDX module owns it), children first.
            sept = [
                (c.base, c.level)
                for c in walk(vm.mmu.pool, root.table, 0, 1 << 62, post_order=True)
                if c.table != root.table
            ]
        vm.mmu.free_root(root, acc, shared=False)  # kvm_mmu_uninit_tdp_mmu: write lock
        if root.role is RootRole.MIRROR and vm.tdx is not None:
            for s, e, _ in acc.runs[before:]:
                vm.tdx.remove_leaves(s, e - s)
            for gfn, level in sept:
                vm.tdx.free_table(gfn, level)
    for v in vm.vcpus.values():
        v.roots.clear()
    ev = record(vm, "vm_destroy", "zap_all", 0, vm.max_gfn + 1, acc, 0, 0, 0, t0)
    vm.destroyed = True
    return ev


@operation("zap")
class ExplicitZap(Op):
    """A diagnostic zap: everything (fast zap) or a GPA range of the chosen roots."""

    scope: str = "range"
    gpa: int | None = None
    size: int | None = None
    roots: str = "both"


@operation("recover_nx_huge_pages")
class RecoverNxHugePages(Op):
    """One run of the kvm-nx-lpage-recovery worker (`ratio`: kvm.nx_huge_pages_recovery_ratio)."""

    ratio: int = 60


@operation("set_zap_policy")
class SetZapPolicy(Op):
    """vkmmu's choice of what a memslot delete zaps (see docs/engine.md)."""

    policy: str


@operation("destroy")
class Destroy(Op):
    """The last reference to the VM goes: every root torn down."""


ZAP_POLICIES = ("kvm", "zap_all_shared_only")


def set_zap_policy(vm: KvmState, op: SetZapPolicy) -> dict[str, Any]:
    policy = op.policy
    if policy not in ZAP_POLICIES:
        raise einval(f"policy must be one of {ZAP_POLICIES}")
    vm.zap_policy = str(policy)
    return {}
