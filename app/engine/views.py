"""The read side of a VM: typed read models (translate, mappings, roots, stats, …) and the
functions that build them from a `KvmState`. Nothing here changes the state; `Vm`'s queries
delegate here. The models are `TypedDict`s: plain dicts at run time, so the API validates and
serialises them as before, while mypy sees every field.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypedDict

from . import spte as S
from .addr import gpa_to_gfn, page_offset, pfn_to_hpa
from .errors import einval
from .introspect import root_runs
from .memslots import slot_view
from .paging import TablePool, path, span
from .roots import Root, RootRole
from .stats import VCPU_STAT_NAMES
from .tdx import OPS as TDX_OPS
from .uapi import VmType

if TYPE_CHECKING:
    from .state import KvmState

# ---------------------------------------------------------------------- translate


class LeafView(TypedDict):
    """Where a translated GPA lands: the leaf's level, the frame (page pfn plus the offset
    of the GPA's page in a huge leaf), its host physical address and permissions."""

    level: int
    pfn: int
    hpa: int
    r: bool
    w: bool
    x: bool


class RootWalkView(TypedDict):
    root: int
    role: str  # RootRole's value: "direct" or "mirror"
    as_id: int
    valid: bool
    # Each entry from the root's level down: `spte.decode`'s fields, `index`, `table_pfn`.
    walk: list[dict[str, object]]
    leaf: LeafView | None  # None: the walk ends non-present


class TranslateView(TypedDict):
    gpa: int
    gfn: int  # without a TD's shared bit
    roots: list[RootWalkView]


def translate(vm: KvmState, gpa: object) -> TranslateView:
    """The walk of `gpa` in every root: the entry at each level, raw and decoded."""
    if isinstance(gpa, bool) or not isinstance(gpa, int) or not 0 <= gpa < vm.gpa_limit:
        raise einval(f"gpa must be in [0, {vm.gpa_limit:#x})")
    pos: int = gpa_to_gfn(gpa)
    out = []
    for root in vm.mmu.roots_of():
        p = pos
        if vm.is_tdx:
            # Both aliases name one GFN; each root is walked at its own position.
            gfn = pos & ~vm.gfn_direct_bits
            p = gfn if root.role is RootRole.MIRROR else gfn | vm.gfn_direct_bits
        out.append(_root_walk(vm.mmu.pool, root, p, gpa))
    return {"gpa": gpa, "gfn": pos & ~vm.gfn_direct_bits, "roots": out}


def _root_walk(pool: TablePool, root: Root, p: int, gpa: int) -> RootWalkView:
    walk: list[dict[str, object]] = []
    leaf: LeafView | None = None
    for table, i, level, e in path(pool, root.table, p):
        d = S.decode(e, level)
        d["index"] = i
        d["table_pfn"] = pool.pfn(table)
        walk.append(d)
        if e & S.SPTE_MMU_PRESENT and (level == 1 or e & S.EPT_PS):
            pfn = S.pfn_of(e) + (p & (span(level) - 1))
            leaf = {
                "level": level,
                "pfn": pfn,
                "hpa": pfn_to_hpa(pfn) | page_offset(gpa),
                "r": bool(e & S.EPT_R),
                "w": bool(e & S.EPT_W),
                "x": bool(e & S.EPT_X),
            }
    return {
        "root": root.id,
        "role": root.role.value,
        "as_id": root.as_id,
        "valid": root.valid,
        "walk": walk,
        "leaf": leaf,
    }


# ---------------------------------------------------------------------- mappings

# Where a page of runs begins: (root id, GFN position); the first run at or after it.
MappingStart = tuple[int, int]


class MappingView(TypedDict):
    """A run of leaf SPTEs: consecutive GFNs at one level, consecutive pfns, same bits."""

    root: int
    role: str
    level: int
    gfn: int  # first GFN, without a TD's shared bit
    position: int  # first GFN as the root indexes it
    pfn: int
    npages: int  # 4 KiB pages
    r: bool
    w: bool
    x: bool


def iter_mappings(
    vm: KvmState, root: object = None, start: MappingStart = (0, 0)
) -> Iterator[MappingView]:
    """Run-length leaf mappings in (root id, position) order, from the first run at or
    after `start` (introspect.root_runs). Lazy: a page of runs walks only the tables it
    covers."""
    for r in vm.mmu.roots_of():
        if (root is not None and r.id != root) or r.id < start[0]:
            continue
        for run in root_runs(vm.mmu.pool, r.table, start[1] if r.id == start[0] else 0):
            yield {
                "root": r.id,
                "role": r.role.value,
                "level": run.level,
                "gfn": run.position & ~vm.gfn_direct_bits,
                "position": run.position,
                "pfn": run.pfn,
                "npages": run.npages,
                "r": bool(run.perm & S.EPT_R),
                "w": bool(run.perm & S.EPT_W),
                "x": bool(run.perm & S.EPT_X),
            }


def mappings(vm: KvmState, root: object = None) -> list[MappingView]:
    """Every run of `iter_mappings`."""
    return list(iter_mappings(vm, root))


# ---------------------------------------------------------------------- roots

LevelCounts = TypedDict("LevelCounts", {"4k": int, "2m": int, "1g": int})


class RootView(TypedDict):
    id: int
    as_id: int
    role: str
    level: int  # the root table's level (4 or 5)
    valid: bool
    obsolete: bool  # TDP MMU roots: role.invalid, not mmu_valid_gen
    generation: int
    table_pfn: int
    sptes: LevelCounts  # leaf SPTEs under the root by level


def roots(vm: KvmState) -> list[RootView]:
    """The TDP roots in id order."""
    return [_root_view(r) for r in vm.mmu.roots_of()]


def _root_view(r: Root) -> RootView:
    return {
        "id": r.id,
        "as_id": r.as_id,
        "role": r.role.value,
        "level": r.level,
        "valid": r.valid,
        "obsolete": not r.valid,
        "generation": r.gen,
        "table_pfn": TablePool.pfn(r.table),
        "sptes": {"4k": r.leaves[1], "2m": r.leaves[2], "1g": r.leaves[3]},
    }


# ---------------------------------------------------------------------- stats

# Stat name -> value, the kernel's binary-stats names first, then vkmmu's: the names are
# `stat_descriptors.DESCRIPTORS`' (the API's `Stats` model is built from them), the TDX ones
# for TDs only. Open keys: the counters are kept as dicts (`stats_kvm`, `stats_extra`).
StatsView = dict[str, int]


def stats(vm: KvmState) -> StatsView:
    """The binary-stats names of the kernel first, then vkmmu's own counters."""
    out: StatsView = dict(vm.stats_kvm)
    out["pages_4k"], out["pages_2m"], out["pages_1g"] = vm.mmu.pages[1:4]
    out.update(vm.stats_extra)
    out["page_tables"] = vm.mmu.pool.live
    out["roots"] = len(vm.mmu.roots)
    for key, v in _leaves_by_role(vm).items():
        out[f"{key}_pages_4k"], out[f"{key}_pages_2m"], out[f"{key}_pages_1g"] = v[1:4]
    out["zapped_not_refaulted"] = vm.zapped.total()
    for name in VCPU_STAT_NAMES:
        out[name] = sum(v.stats[name] for v in vm.vcpus.values())
    if vm.tdx is not None:
        for op in TDX_OPS:
            out["tdx_" + op.lower().replace(".", "_")] = vm.tdx.ops.get(op, 0)
        out["tdx_reaccepts"] = vm.tdx.reaccepts
        out["tdx_accepted_pages"] = vm.tdx.accepted.total()
    return out


def _leaves_by_role(vm: KvmState) -> dict[str, list[int]]:
    """Present leaves by level (index 1…3) of the shared and the private view."""
    by_role = {"shared": [0, 0, 0, 0], "private": [0, 0, 0, 0]}
    for r in vm.mmu.roots.values():
        key = "private" if r.role is RootRole.MIRROR else "shared"
        by_role[key] = [a + b for a, b in zip(by_role[key], r.leaves, strict=True)]
    if vm.has_private_mem and not vm.is_tdx:
        # One root holds both views: guest_memfd pfns are the private leaves (all 4K).
        priv = sum(r.gmem_leaves for r in vm.mmu.roots.values())
        by_role["private"][1] += priv
        by_role["shared"][1] -= priv
    return by_role


# ---------------------------------------------------------------------- the VM, memslots, TDX


def info(vm: KvmState) -> dict[str, Any]:
    """The VM's summary (GET /v1/vms/{vm}). An open dict: the service keeps it in the VM's
    row with more keys beside it, and the digest (codec) drops some."""
    return {
        "vm_type": int(vm.vm_type),
        "vm_type_name": vm.vm_type.name,
        "name": vm.name,
        "vcpus": len(vm.vcpus),
        "paging_levels": vm.paging_levels,
        "nr_address_spaces": vm.nr_as,
        "has_private_mem": vm.has_private_mem,
        "gfn_direct_bits": vm.gfn_direct_bits,
        "zap_policy": vm.zap_policy,
        "slot_zap_all_applies": vm.vm_type == VmType.KVM_X86_DEFAULT_VM and vm.quirk_zap_all,
        "memslots": sum(len(s) for s in vm.spaces),
        "destroyed": vm.destroyed,
        "host": vm.host_profile.to_dict(),
        "engine_rev": vm.engine_rev,
    }


def memslots(vm: KvmState) -> list[dict[str, Any]]:
    """Every memslot of every address space, by slot number (as_id << 16 | id)."""
    out = [slot_view(vm, slot) or {} for space in vm.spaces for slot in space]
    return sorted(out, key=lambda d: d["slot"])


class MapGpaPendingView(TypedDict):
    vcpu: int
    next_gpa: int
    end_gpa: int


def tdx_state(vm: KvmState) -> dict[str, object]:
    """A TD's TDX module state (`TdxState.to_dict`), its lifecycle and the vCPUs waiting in
    a MapGPA exit; EINVAL for a VM that is not a TD."""
    if vm.tdx is None:
        raise einval("not a TD")
    pending: list[MapGpaPendingView] = [
        {"vcpu": v, "next_gpa": a, "end_gpa": b} for v, (a, b) in sorted(vm.tdx.map_gpa.items())
    ]
    return {
        **vm.tdx.to_dict(),
        "lifecycle": vm.tdx.lifecycle_dict(),
        "map_gpa_pending": pending,
    }
