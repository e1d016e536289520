"""Random private-memory sequences on SW_PROTECTED VMs and TDs against a reference model (issue 4).

The model knows nothing of page tables. It holds the PRIVATE attribute per GFN, the memslots,
the bytes of host pages (by HVA page) and of guest_memfd pages (by file page), and for a TD
which GFNs have a private page in the S-EPT (AUGed) and which the guest accepted. It predicts
every exit and every byte a load returns; `audit` must be clean after every step.

Layout (GFNs): slot 0 = [0, 8) bound to the guest_memfd (file offset 0 or 8 pages), slot 1 =
[8, 12) without guest_memfd, [12, 14) no memslot. Slots are smaller than 2 MiB, so no mapping
is ever huge and no attribute zap is ever widened.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.engine import Vm
from app.engine.ops import parse

SW_PROT, TDX = 1, 5
PRIVATE = 8
GMEM = 4
PAGE = 4096
NGFN = 14
FILE_PAGES = 16
HVA = {0: 0x7F00_0000_0000, 1: 0x7F00_1000_0000}
BASE = {0: 0, 1: 8}
NPAGES = {0: 8, 1: 4}
MEMORY_FAULT = "KVM_EXIT_MEMORY_FAULT"
MMIO = "KVM_EXIT_MMIO"

gfns = st.integers(0, NGFN - 1)
counts = st.integers(1, 4)
payloads = st.binary(min_size=1, max_size=16)
offsets = st.sampled_from([0, 8, 100, PAGE - 16])


def mem_fault(gfn: int, private: bool, size: int = PAGE) -> dict[str, Any]:
    return {
        "reason": MEMORY_FAULT,
        "gpa": gfn * PAGE,
        "size": size,
        "flags": PRIVATE if private else 0,
    }


class Stop(Exception):
    def __init__(self, exit: dict[str, Any]) -> None:
        super().__init__(exit["reason"])
        self.exit = exit


class PrivateMachine(RuleBasedStateMachine):
    @initialize(vm_type=st.sampled_from([SW_PROT, TDX]), levels=st.sampled_from([4, 5]))
    def setup(self, vm_type: int, levels: int) -> None:
        self.tdx = vm_type == TDX
        self.vm = Vm.create(vm_type, 1, paging_levels=levels if self.tdx else 4)
        self.shared_bit = (1 << (47 if levels == 4 else 51)) if self.tdx else 0
        self.fd = self.vm.apply(
            parse("create_guest_memfd", {"size": FILE_PAGES * PAGE, "flags": 0})
        )["fd"]
        self.private: set[int] = set()
        self.slots: dict[int, int | None] = {}  # slot id -> guest_memfd offset in pages
        self.host: dict[int, bytearray] = {}  # HVA page -> bytes
        self.gm: dict[int, bytearray] = {}  # file page -> bytes (absent: zeros)
        self.augd: dict[int, int] = {}  # TD: GFN -> file page its mirror leaf maps
        self.accepted: set[int] = set()
        self.lost: set[int] = set()  # accepted, then removed: a re-accept is due
        self.reaccepts = 0
        self.create(0, 0)
        self.create(1, None)

    # -- model helpers ------------------------------------------------------------------------
    def create(self, sid: int, off: int | None) -> None:
        args: dict[str, Any] = {
            "slot": sid,
            "flags": GMEM if off is not None else 0,
            "guest_phys_addr": BASE[sid] * PAGE,
            "memory_size": NPAGES[sid] * PAGE,
            "userspace_addr": HVA[sid],
        }
        if off is not None:
            args.update(guest_memfd=self.fd, guest_memfd_offset=off * PAGE)
        res = self.vm.apply(parse("set_user_memory_region", args))
        assert res["change"] == "create"
        self.slots[sid] = off

    def slot_of(self, gfn: int) -> int | None:
        for sid in self.slots:
            if BASE[sid] <= gfn < BASE[sid] + NPAGES[sid]:
                return sid
        return None

    def remove_private(self, gfns_: list[int]) -> None:
        """S-EPT removal of TD private pages: cleared, and no longer accepted."""
        for g in gfns_:
            index = self.augd.pop(g, None)
            if index is None:
                continue
            self.gm.pop(index, None)
            if g in self.accepted:
                self.accepted.discard(g)
                self.lost.add(g)

    def fault(self, gfn: int, private: bool, *, pending_exits: bool = True) -> int | None:
        """One page of a guest access; raises Stop with the exit. Returns the backing:
        a file page for private, None for shared."""
        if private != (gfn in self.private):
            raise Stop(mem_fault(gfn, private))
        sid = self.slot_of(gfn)
        if sid is None:
            if private:
                raise Stop(mem_fault(gfn, True))
            raise Stop({"reason": MMIO})
        if not private:
            return None
        off = self.slots[sid]
        if off is None:
            raise Stop(mem_fault(gfn, True))
        index = off + gfn - BASE[sid]
        if self.tdx:
            self.augd.setdefault(gfn, index)
            if pending_exits and gfn not in self.accepted:
                raise Stop(mem_fault(gfn, True, size=0))
        return index

    def kind(self, gfn: int, shared: bool) -> bool:
        """Whether the access is private: the GPA's shared bit on a TD, attributes otherwise."""
        return not shared if self.tdx else gfn in self.private

    def gpa(self, gfn: int, shared: bool, offset: int = 0) -> int:
        return gfn * PAGE + offset | (self.shared_bit if self.tdx and shared else 0)

    def page(self, gfn: int, index: int | None) -> bytearray:
        if index is not None:
            return self.gm.setdefault(index, bytearray(PAGE))
        sid = self.slot_of(gfn)
        assert sid is not None
        return self.host.setdefault((HVA[sid] >> 12) + gfn - BASE[sid], bytearray(PAGE))

    @staticmethod
    def same_exit(got: dict[str, Any] | None, want: dict[str, Any] | None) -> None:
        if want is None or got is None:
            assert got == want
        elif want["reason"] == MMIO:
            assert got["reason"] == MMIO, got
        else:
            assert got == want

    # -- rules --------------------------------------------------------------------------------
    @rule(start=gfns, n=counts, private=st.booleans())
    def set_attributes(self, start: int, n: int, private: bool) -> None:
        n = min(n, NGFN - start)
        rng = range(start, start + n)
        changed = any((g in self.private) != private for g in rng)
        res = self.vm.apply(
            parse(
                "set_memory_attributes",
                {
                    "address": start * PAGE,
                    "size": n * PAGE,
                    "attributes": PRIVATE if private else 0,
                    "flags": 0,
                },
            ),
        )
        assert res["changed"] is changed
        if not changed:
            assert res["zap"] is None
            return
        # kvm_vm_set_mem_attributes unmaps the range through every memslot it meets: an
        # event exactly when some slot of the model overlaps it.
        if any(self.slot_of(g) is not None for g in rng):
            assert res["zap"] is not None and res["zap"]["cause"] == "attributes"
        else:
            assert res["zap"] is None
        if not private and self.tdx:
            self.remove_private(list(rng))
        if private:
            self.private.update(rng)
        else:
            self.private.difference_update(rng)

    @rule(start=gfns, n=counts, shared=st.booleans(), write=st.booleans())
    def access(self, start: int, n: int, shared: bool, write: bool) -> None:
        n = min(n, NGFN - start)
        want = None
        try:
            for g in range(start, start + n):
                self.fault(g, self.kind(g, shared))
        except Stop as e:
            want = e.exit
        res = self.vm.apply(
            parse(
                "access",
                {
                    "vcpu": 0,
                    "gpa": self.gpa(start, shared),
                    "size": n * PAGE,
                    "access": "write" if write else "read",
                },
            ),
        )
        self.same_exit(res["exit"], want)

    @rule(gfn=gfns, offset=offsets, data=payloads, shared=st.booleans())
    def store(self, gfn: int, offset: int, data: bytes, shared: bool) -> None:
        want = None
        try:
            index = self.fault(gfn, self.kind(gfn, shared))
            self.page(gfn, index)[offset : offset + len(data)] = data
        except Stop as e:
            want = e.exit
        res = self.vm.apply(
            parse("store", {"vcpu": 0, "gpa": self.gpa(gfn, shared, offset), "data": data.hex()})
        )
        self.same_exit(res.get("exit"), want)

    @rule(gfn=gfns, offset=offsets, n=st.integers(1, 16), shared=st.booleans())
    def load(self, gfn: int, offset: int, n: int, shared: bool) -> None:
        want_exit, want_data = None, None
        try:
            index = self.fault(gfn, self.kind(gfn, shared))
            want_data = bytes(self.page(gfn, index)[offset : offset + n]).hex()
        except Stop as e:
            want_exit = e.exit
        res = self.vm.apply(
            parse("load", {"vcpu": 0, "gpa": self.gpa(gfn, shared, offset), "len": n})
        )
        self.same_exit(res.get("exit"), want_exit)
        if want_exit is None:
            assert res["data"] == want_data, (gfn, offset, n)

    @precondition(lambda self: self.tdx)
    @rule(start=gfns, n=counts)
    def accept(self, start: int, n: int) -> None:
        n = min(n, NGFN - start)
        new = re = 0
        want = None
        try:
            for g in range(start, start + n):
                self.fault(g, True, pending_exits=False)
                if g not in self.accepted:
                    self.accepted.add(g)
                    new += 1
                if g in self.lost:
                    self.lost.discard(g)
                    re += 1
        except Stop as e:
            want = e.exit
        self.reaccepts += re
        res = self.vm.apply(parse("accept", {"vcpu": 0, "gpa": start * PAGE, "size": n * PAGE}))
        assert (res["accepted"], res["reaccepted"]) == (new, re), res
        self.same_exit(res["exit"], want)

    @rule(first=st.integers(0, FILE_PAGES - 1), n=counts)
    def punch(self, first: int, n: int) -> None:
        n = min(n, FILE_PAGES - first)
        hole = range(first, first + n)
        res = self.vm.apply(
            parse(
                "gmem_fallocate",
                {"fd": self.fd, "mode": "punch_hole", "offset": first * PAGE, "len": n * PAGE},
            ),
        )
        # kvm_gmem_invalidate: an event exactly when the hole meets a slot's binding.
        bound = [(off, off + NPAGES[sid]) for sid, off in self.slots.items() if off is not None]
        if any(lo < first + n and first < hi for lo, hi in bound):
            assert res["zap"] is not None and res["zap"]["cause"] == "punch_hole"
        else:
            assert res["zap"] is None
        self.remove_private([g for g, i in self.augd.items() if i in hole])
        for i in hole:
            self.gm.pop(i, None)

    @rule(sid=st.sampled_from([0, 1]), off=st.sampled_from([0, 8]))
    def toggle_slot(self, sid: int, off: int) -> None:
        """Delete the slot if it exists, else create it again (slot 0 at either file offset)."""
        if sid in self.slots:
            res = self.vm.apply(
                parse(
                    "set_user_memory_region",
                    {
                        "slot": sid,
                        "flags": 0,
                        "guest_phys_addr": 0,
                        "memory_size": 0,
                        "userspace_addr": HVA[sid],
                    },
                ),
            )
            assert res["change"] == "delete"
            assert res["zap"]["path"] == "zap_slot_leafs"
            del self.slots[sid]
            if self.tdx:
                self.remove_private(list(range(BASE[sid], BASE[sid] + NPAGES[sid])))
        else:
            self.create(sid, off if sid == 0 else None)

    @rule(sid=st.sampled_from([0, 1]), page=st.integers(0, 3), offset=offsets, data=payloads)
    def host_write(self, sid: int, page: int, offset: int, data: bytes) -> None:
        hva = HVA[sid] + page * PAGE + offset
        self.vm.apply(parse("host_write", {"userspace_addr": hva, "data": data.hex()}))
        buf = self.host.setdefault((HVA[sid] >> 12) + page, bytearray(PAGE))
        buf[offset : offset + len(data)] = data

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def audit_clean(self) -> None:
        report = self.vm.audit()
        assert report["ok"], report["violations"]

    @invariant()
    def td_bookkeeping(self) -> None:
        if not self.tdx:
            return
        st_ = self.vm.tdx_state()
        assert st_["accepted_pages"] == len(self.accepted)
        assert st_["pending_reaccept_pages"] == len(self.lost)
        assert st_["reaccepts"] == self.reaccepts
        assert self.vm.stats()["private_pages_4k"] == len(self.augd)


PrivateMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrivateMachine = PrivateMachine.TestCase
