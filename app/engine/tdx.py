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


class TdxOrderError(AssertionError):
    """The TDX module would refuse this sequence: a modelling bug, never user input."""


class TdxState:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.epoch = 0
        self.hkid_assigned = True
        self.accepted = IntervalSet()  # GFNs the guest accepted (mapped & accepted)
        self.blocked = IntervalSet()  # transient during removal; empty between calls
        self.lost = IntervalSet()  # GFNs that were accepted, then zapped: a re-accept is due
        self.reaccepts = 0
        self.log: deque[tuple[str, int, int]] = deque(maxlen=256)  # (op, gfn_start, gfn_end)

    def _op(self, name: str, start: int, end: int, count: int = 1) -> None:
        self.ops[name] += count
        self.log.append((name, start, end))

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
