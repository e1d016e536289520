"""Read-only views of the page tables: a page walk and run-length leaf mappings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import spte as S
from .errors import einval
from .paging import span
from .uapi import PAGE_SHIFT

if TYPE_CHECKING:
    from .vm import Vm


def translate(vm: Vm, gpa: object) -> dict[str, Any]:
    """The walk of `gpa` in every root: the entry at each level, raw and decoded."""
    if isinstance(gpa, bool) or not isinstance(gpa, int) or not 0 <= gpa < vm.gpa_limit:
        raise einval(f"gpa must be in [0, {vm.gpa_limit:#x})")
    pos = gpa >> PAGE_SHIFT
    out = []
    for root in vm.mmu.roots_of():
        p = pos
        if vm.is_tdx:
            # Both aliases name one GFN; each root is walked at its own position.
            gfn = pos & ~vm.gfn_direct_bits
            p = gfn if root.role.value == "mirror" else gfn | vm.gfn_direct_bits
        walk = []
        table, level = root.table, root.level
        leaf = None
        while True:
            i = (p >> (9 * (level - 1))) & 511
            e = int(vm.mmu.pool.entries(table)[i])
            d = S.decode(e, level)
            d["index"] = i
            d["table_pfn"] = vm.mmu.pool.pfn(table)
            walk.append(d)
            if not e & S.SPTE_MMU_PRESENT:
                break
            if level == 1 or e & S.EPT_PS:
                pfn = S.pfn_of(e) + (p & (span(level) - 1))
                leaf = {
                    "level": level,
                    "pfn": pfn,
                    "hpa": (pfn << PAGE_SHIFT) | (gpa & 0xFFF),
                    "r": bool(e & S.EPT_R),
                    "w": bool(e & S.EPT_W),
                    "x": bool(e & S.EPT_X),
                }
                break
            table, level = vm.mmu.pool.child(e), level - 1
        out.append(
            {
                "root": root.id,
                "role": root.role.value,
                "as_id": root.as_id,
                "valid": root.valid,
                "walk": walk,
                "leaf": leaf,
            }
        )
    return {"gpa": gpa, "gfn": pos & ~vm.gfn_direct_bits, "roots": out}


def mappings(vm: Vm, root: object = None) -> list[dict[str, Any]]:
    """Run-length leaf mappings: consecutive GFNs at one level with consecutive pfns and the
    same permission bits form one run."""
    runs: list[dict[str, Any]] = []
    for r in vm.mmu.roots_of():
        if root is not None and r.id != root:
            continue
        cur_run: dict[str, Any] | None = None
        for cur, sl, idx in vm.mmu.leaf_iter(r):
            sp = span(cur.level)
            ent = sl[idx]
            pfns = (ent & S.U_ADDR) >> S.U_SHIFT
            perms = ent & np.uint64(S.EPT_R | S.EPT_W | S.EPT_X)
            gfns = cur.base + (cur.lo + idx.astype(np.int64)) * sp
            # Break where gfn, pfn or permissions do not continue the previous entry.
            brk = np.ones(len(idx), dtype=bool)
            if len(idx) > 1:
                brk[1:] = (
                    (np.diff(gfns) != sp)
                    | (np.diff(pfns.astype(np.int64)) != sp)
                    | (perms[1:] != perms[:-1])
                )
            starts = np.flatnonzero(brk)
            ends = np.append(starts[1:], len(idx))
            for a, b in zip(starts, ends, strict=True):
                g0, p0, pm = int(gfns[a]), int(pfns[a]), int(perms[a])
                if (
                    cur_run is not None
                    and cur_run["level"] == cur.level
                    and cur_run["_gend"] == g0
                    and cur_run["_pend"] == p0
                    and cur_run["_perm"] == pm
                ):
                    cur_run["npages"] += int(b - a) * sp
                else:
                    if cur_run is not None:
                        runs.append(cur_run)
                    cur_run = {
                        "root": r.id,
                        "role": r.role.value,
                        "level": cur.level,
                        "gfn": g0 & ~vm.gfn_direct_bits,
                        "position": g0,
                        "pfn": p0,
                        "npages": int(b - a) * sp,
                        "r": bool(pm & 1),
                        "w": bool(pm & 2),
                        "x": bool(pm & 4),
                        "_perm": pm,
                    }
                cur_run["_gend"] = g0 + int(b - a) * sp
                cur_run["_pend"] = p0 + int(b - a) * sp
        if cur_run is not None:
            runs.append(cur_run)
    for run in runs:
        for k in ("_gend", "_pend", "_perm"):
            run.pop(k, None)
    return runs
