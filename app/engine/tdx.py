"""The TDX module's side of a TD's private memory: S-EPT page states and SEAMCALL counts.

KVM's mirror root describes the S-EPT in KVM's own format; every change to a mirror entry is
pushed to the TDX module with the operations counted here, in the order the module demands
(kvm-private-tdx.md §5.2–§5.5): tables are linked with SEPT.ADD, leaves installed with
PAGE.AUG (the page is PENDING until the guest accepts it), and removed with RANGE.BLOCK, TRACK
(a TLB epoch after which every vCPU is kicked) and PAGE.REMOVE, leaf before table.
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np

from .intervals import IntervalSet

OPS = (
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "TDH.MEM.PAGE.REMOVE",
    "TDH.PHYMEM.PAGE.WBINVD",
    "TDH.PHYMEM.PAGE.RECLAIM",
    "TDG.MEM.PAGE.ACCEPT",
)


# The TD's own lifecycle SEAMCALLs (KVM_TDX_INIT_VM / INIT_VCPU / INIT_MEM_REGION / FINALIZE_VM),
# shown apart from OPS so that the counters of TDs from before the lifecycle keep their shape.
LIFECYCLE_OPS = (
    "TDH.MNG.CREATE",
    "TDH.MNG.KEY.CONFIG",
    "TDH.MNG.INIT",
    "TDH.VP.CREATE",
    "TDH.VP.INIT",
    "TDH.MEM.PAGE.ADD",
    "TDH.MR.EXTEND",
    "TDH.MR.FINALIZE",
)

# kvm_tdx->state (arch/x86/kvm/vmx/tdx.h): TD_STATE_UNINITIALIZED / INITIALIZED / RUNNABLE.
TD_STATES = ("uninitialized", "initialized", "runnable")
TDX_TD_ATTR_SEPT_VE_DISABLE = 1 << 28  # KVM_SUPPORTED_TD_ATTRS in tdx.c
TDX_EXTENDMR_CHUNKS = 16  # TDH.MR.EXTEND measures 256 bytes: 16 per 4 KiB page


class TdxOrderError(AssertionError):
    """The TDX module would refuse this sequence: a modelling bug, never user input."""


class TdxState:
    def __init__(self, lifecycle: bool = False) -> None:
        self.ops: Counter[str] = Counter()
        self.epoch = 0
        # A TD created without the lifecycle (every TD before it existed) starts runnable
        # with its HKID assigned and every vCPU initialised (`init_vcpus` None).
        self.lifecycle = lifecycle
        self.td_state = "uninitialized" if lifecycle else "runnable"
        self.hkid_assigned = not lifecycle
        self.init_vcpus: set[int] | None = set() if lifecycle else None
        self.attributes = 0
        self.gpaw = 0
        self.premapped = 0  # mirror leaves mapped before finalize, not yet PAGE.ADDed
        # vCPU → (next GPA, end) of a MapGPA waiting in KVM_EXIT_HYPERCALL (hypercall.py)
        self.map_gpa: dict[int, tuple[int, int]] = {}
        self.accepted = IntervalSet()  # GFNs the guest accepted (mapped & accepted)
        self.blocked = IntervalSet()  # transient during removal; empty between calls
        self.lost = IntervalSet()  # GFNs that were accepted, then zapped: a re-accept is due
        self.reaccepts = 0
        self.log: deque[tuple[str, int, int]] = deque(maxlen=256)  # (op, gfn_start, gfn_end)

    def _op(self, name: str, start: int, end: int, count: int = 1) -> None:
        self.ops[name] += count
        self.log.append((name, start, end))

    @property
    def runnable(self) -> bool:
        return self.td_state == "runnable"

    def vcpu_initialized(self, vcpu: int) -> bool:
        return self.init_vcpus is None or vcpu in self.init_vcpus

    def set_private_spte(self, gfn: int, n: int) -> None:
        """tdx_sept_set_private_spte: a runnable TD gets PAGE.AUG (the page is PENDING); before
        finalize the leaf is only counted as premapped until INIT_MEM_REGION's PAGE.ADD."""
        if self.runnable:
            self.aug(gfn, n)
        else:
            self.premapped += n

    def page_add(self, gfn: int, measure: bool) -> None:
        """tdx_gmem_post_populate: TDH.MEM.PAGE.ADD copies the source page into the TD (the
        page is mapped and accepted at once), then TDH.MR.EXTEND per 256 bytes if measured."""
        self._op("TDH.MEM.PAGE.ADD", gfn, gfn + 1)
        self.premapped -= 1
        if measure:
            self._op("TDH.MR.EXTEND", gfn, gfn + 1, TDX_EXTENDMR_CHUNKS)
        self.accepted.add(gfn, gfn + 1)

    def lifecycle_op(self, name: str, count: int = 1) -> None:
        self._op(name, 0, 0, count)

    def lifecycle_dict(self) -> dict[str, object]:
        return {
            "td_state": self.td_state,
            "vcpus_initialized": None if self.init_vcpus is None else sorted(self.init_vcpus),
            "attributes": self.attributes,
            "gpaw": self.gpaw,
            "ops": {op: self.ops.get(op, 0) for op in LIFECYCLE_OPS},
        }

    def sept_add(self, gfn: int, level: int) -> None:
        self._op("TDH.MEM.SEPT.ADD", gfn, gfn + (1 << (9 * level)))

    def aug(self, gfn: int, n: int) -> None:
        self._op("TDH.MEM.PAGE.AUG", gfn, gfn + n, n)

    def accepted_mask(self, gfn: int, count: int) -> np.ndarray:
        return self.accepted.mask(gfn, count)

    def accept(self, gfn: int, n: int) -> tuple[int, int]:
        """The guest accepts PENDING pages; returns (accepted, re-accepted)."""
        already = self.accepted.overlap(gfn, gfn + n)
        new = n - already
        re = self.lost.overlap(gfn, gfn + n)
        self.lost.remove(gfn, gfn + n)
        self.accepted.add(gfn, gfn + n)
        self.reaccepts += re
        self._op("TDG.MEM.PAGE.ACCEPT", gfn, gfn + n, new)
        return new, re

    def remove_leaves(self, gfn: int, n: int) -> None:
        """BLOCK → TRACK → REMOVE → WBINVD for each private page leaving the S-EPT; after the
        HKID is released, a plain RECLAIM (kvm-private-tdx.md §5.3)."""
        if not self.hkid_assigned:
            self._op("TDH.PHYMEM.PAGE.RECLAIM", gfn, gfn + n, n)
        else:
            self.blocked.add(gfn, gfn + n)
            self._op("TDH.MEM.RANGE.BLOCK", gfn, gfn + n, n)
            # One TRACK per removal: the epoch must move on between BLOCK and REMOVE.
            # tdx_track returns early before finalize: no vCPU has run, no TLB to flush.
            if self.runnable:
                self.epoch += n
                self._op("TDH.MEM.TRACK", gfn, gfn + n, n)
            if self.blocked.overlap(gfn, gfn + n) != n:
                raise TdxOrderError("PAGE.REMOVE of a page that is not BLOCKED")
            self._op("TDH.MEM.PAGE.REMOVE", gfn, gfn + n, n)
            self._op("TDH.PHYMEM.PAGE.WBINVD", gfn, gfn + n, n)
            self.blocked.remove(gfn, gfn + n)
        for lo, hi in self.accepted.clipped(gfn, gfn + n):
            self.lost.add(lo, hi)
        self.accepted.remove(gfn, gfn + n)

    def free_table(self, gfn: int, level: int) -> None:
        """An S-EPT table page goes back only after the HKID is released (§5.4 rule 1)."""
        if self.hkid_assigned:
            raise TdxOrderError("S-EPT table freed while the TD's HKID is assigned")
        self._op("TDH.PHYMEM.PAGE.RECLAIM", gfn, gfn + (1 << (9 * level)))

    def to_dict(self) -> dict[str, object]:
        return {
            "ops": {op: self.ops.get(op, 0) for op in OPS},
            "epoch": self.epoch,
            "hkid_assigned": self.hkid_assigned,
            "accepted_pages": self.accepted.total(),
            "pending_reaccept_pages": self.lost.total(),
            "reaccepts": self.reaccepts,
            "recent": [{"op": op, "gfn_start": s, "gfn_end": e} for op, s, e in self.log],
        }
