"""Random KVM_SET_USER_MEMORY_REGION2 sequences: the memslot engine against a tiny reference model.

The reference is a dict slot key -> (gpa, size, uaddr, flags, fd, offset), checked with plain
linear scans. Engine and model must agree on every outcome (errno or change kind) and on the
state after every step.
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.engine import uapi
from app.engine.errors import KvmError
from app.engine.gmem import GmemTable
from app.engine.memslots import (
    ChangeKind,
    MemslotSet,
    SetUserMemoryRegion,
    check_arch_prepare,
    check_region,
)

PAGE = 4096
LOG, RO, GMEM = 1, 2, 4
U64 = (1 << 64) - 1
USER_END = uapi.USER_ADDR_END_4LEVEL
MAX_GFN = (1 << 40) - 1
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
VM_TYPES = [int(t) for t in uapi.SUPPORTED_VM_TYPES]
UADDRS = [0x1000_0000, 0x2000_0000, 0x3000_0000]

Entry = tuple[int, int, int, int, int | None, int]  # gpa, size, uaddr, flags, fd, offset


def pages(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi).map(lambda n: n * PAGE)


def mostly(good: st.SearchStrategy[int], odd: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """`good` about 7 times in 8: odd values are for the rarer error paths."""
    return st.one_of(*([good] * 7), odd)


slot_ids = mostly(
    st.one_of(st.integers(0, 5), st.integers(0, 3).map(lambda i: (1 << 16) | i)),
    st.sampled_from([2 << 16, 32763, 32764, 0xFFFF, (1 << 32) - 1, -1]),
)
gpas = mostly(
    pages(0, 64),
    st.sampled_from([0x800, U64 - PAGE + 1, (MAX_GFN + 1) * PAGE, (MAX_GFN - 3) * PAGE, 1 << 64]),
)
sizes = mostly(pages(0, 16), st.sampled_from([0x10, (1 << 31) * PAGE, -PAGE]))
uaddrs = mostly(st.sampled_from(UADDRS), st.sampled_from([0x1000_0010, USER_END, 1 << 60]))
flag_values = st.sampled_from([0, 0, LOG, LOG, RO, RO | LOG, GMEM, GMEM, GMEM | LOG, GMEM | RO, 8])
offsets = mostly(pages(0, 40), st.sampled_from([0x10, 1 << 63, U64 - PAGE + 1]))
fds = st.sampled_from([3, 3, 4, 4, 99, 0])


def fits(v: object, bits: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << bits)


class MemslotMachine(RuleBasedStateMachine):
    @initialize(vm_type=st.sampled_from(VM_TYPES))
    def setup(self, vm_type: int) -> None:
        self.vm_type = vm_type
        self.nr_as = 1 if vm_type in uapi.PRIVATE_MEM_VM_TYPES else 2
        self.spaces = [MemslotSet(a) for a in range(self.nr_as)]
        self.gmem = GmemTable(owner="vm")
        self.fds = [self.gmem.create(n * PAGE, 0, vm_type=vm_type).fd for n in (48, 16)]
        self.sizes = {fd: n * PAGE for fd, n in zip(self.fds, (48, 16), strict=True)}
        self.closed: set[int] = set()
        self.ref: dict[tuple[int, int], Entry] = {}

    # -- the reference model ------------------------------------------------------------
    def expected(self, r: SetUserMemoryRegion) -> int | str:
        """errno or change kind, from the rules restated as plain predicates."""
        fields = [(r.slot, 32), (r.flags, 32), (r.guest_phys_addr, 64), (r.memory_size, 64)]
        fields += [(r.userspace_addr, 64), (r.guest_memfd, 32), (r.guest_memfd_offset, 64)]
        if not all(fits(v, b) for v, b in fields):
            return errno.EINVAL
        slot, flags, gpa, size, uaddr = (
            r.slot,
            r.flags,
            r.guest_phys_addr,
            r.memory_size,
            r.userspace_addr,
        )
        fd, off = r.guest_memfd, r.guest_memfd_offset
        as_id, id = slot >> 16, slot & 0xFFFF
        gm = bool(flags & GMEM)
        allowed = {0, LOG, GMEM} | ({RO, RO | LOG} if self.vm_type != TDX else set())
        einval = [
            id >= 32764,
            flags not in allowed,
            size % PAGE != 0 or gpa % PAGE != 0 or uaddr % PAGE != 0,
            uaddr + size > USER_END,
            gm and (off % PAGE != 0 or off + size > U64),
            as_id >= self.nr_as,
            gpa + size > U64,
            size // PAGE > (1 << 31) - 1,
        ]
        if any(einval):
            return errno.EINVAL
        old = self.ref.get((as_id, id))
        if size == 0:
            return "delete" if old else errno.EINVAL
        if old is None:
            kind = "create"
        else:
            ogpa, osize, ouaddr, oflags, _, _ = old
            if gm or uaddr != ouaddr or size != osize or (flags ^ oflags) & (RO | GMEM):
                return errno.EINVAL
            kind = "move" if gpa != ogpa else "flags_only" if flags != oflags else "none"
            if kind == "none":
                return kind
        for (a, i), (g, s, *_rest) in self.ref.items():
            if a == as_id and i != id and g < gpa + size and gpa < g + s:
                return errno.EEXIST
        if gm:
            if fd in (0, 1, 2):
                return errno.EINVAL
            if fd not in self.fds or fd in self.closed:
                return errno.EBADF
            if off >= 1 << 63 or off + size > self.sizes[fd]:
                return errno.EINVAL
            for _g, s, _, f, bfd, boff in self.ref.values():
                if f & GMEM and bfd == fd and boff < off + size and off < boff + s:
                    return errno.EEXIST
        if (gpa + size) // PAGE - 1 > MAX_GFN:
            return errno.EINVAL  # V21 (arch prepare)
        return kind

    def model_apply(self, r: SetUserMemoryRegion, kind: str) -> None:
        key = (r.slot >> 16, r.slot & 0xFFFF)
        if kind == "delete":
            del self.ref[key]
        elif kind == "create":
            gm = r.flags & GMEM
            self.ref[key] = (
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr,
                r.flags,
                r.guest_memfd if gm else None,
                r.guest_memfd_offset if gm else 0,
            )
        elif kind in ("move", "flags_only"):
            _, size, uaddr, _, fd, off = self.ref[key]
            self.ref[key] = (r.guest_phys_addr, size, uaddr, r.flags, fd, off)

    # -- the engine, performing a change the way vm.py does (minus the MMU) ---------------
    def engine(self, r: SetUserMemoryRegion) -> int | str:
        try:
            change = check_region(
                r, vm_type=self.vm_type, spaces=self.spaces, gmem=self.gmem, user_addr_end=USER_END
            )
            if change.kind in (ChangeKind.CREATE, ChangeKind.MOVE):
                check_arch_prepare(change, max_gfn=MAX_GFN, gfn_direct_bits=0)
        except KvmError as e:
            return e.errno
        old, new = change.old, change.new
        if change.kind in (ChangeKind.DELETE, ChangeKind.MOVE, ChangeKind.FLAGS_ONLY):
            assert old is not None
            self.spaces[old.as_id].remove(old.id)
            if change.kind is ChangeKind.DELETE:
                self.gmem.unbind(old.guest_memfd, (old.as_id, old.id))
        if change.kind in (ChangeKind.CREATE, ChangeKind.MOVE, ChangeKind.FLAGS_ONLY):
            assert new is not None
            if change.kind is ChangeKind.CREATE and new.guest_memfd is not None:
                self.gmem.bind(
                    new.guest_memfd, new.guest_memfd_offset, new.npages, (new.as_id, new.id)
                )
            self.spaces[new.as_id].install(new)
        return change.kind.value

    def step(self, r: SetUserMemoryRegion) -> None:
        want = self.expected(r)
        got = self.engine(r)
        assert got == want, (r, got, want)
        if isinstance(want, str):
            self.model_apply(r, want)

    # -- rules ---------------------------------------------------------------------------
    @rule(
        slot=slot_ids,
        gpa=gpas,
        size=sizes,
        uaddr=uaddrs,
        flags=flag_values,
        fd=fds,
        off=offsets,
    )
    def any_request(self, slot, gpa, size, uaddr, flags, fd, off) -> None:  # type: ignore[no-untyped-def]
        self.step(SetUserMemoryRegion(slot, flags, gpa, size, uaddr, fd, off))

    @rule(
        id=st.integers(0, 7),
        smm=st.booleans(),
        gpa=pages(0, 64),
        size=pages(1, 16),
        uaddr=st.sampled_from(UADDRS),
        flags=st.sampled_from([0, LOG, RO, GMEM, GMEM]),
        fd=fds,
        off=pages(0, 40),
    )
    def well_formed_request(self, id, smm, gpa, size, uaddr, flags, fd, off) -> None:  # type: ignore[no-untyped-def]
        slot = ((1 << 16) if smm and self.nr_as > 1 else 0) | id
        self.step(SetUserMemoryRegion(slot, flags, gpa, size, uaddr, fd, off))

    def pick(self, data: st.DataObject) -> tuple[int, Entry]:
        (as_id, id), entry = data.draw(st.sampled_from(sorted(self.ref.items())))
        return (as_id << 16) | id, entry

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def toggle_dirty_logging(self, data: st.DataObject) -> None:
        slot, (gpa, size, uaddr, flags, fd, off) = self.pick(data)
        self.step(SetUserMemoryRegion(slot, flags ^ LOG, gpa, size, uaddr, fd or 0, off))

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data(), gpa=pages(0, 64), flip_log=st.booleans())
    def move_existing(self, data: st.DataObject, gpa: int, flip_log: bool) -> None:
        slot, (_, size, uaddr, flags, fd, off) = self.pick(data)
        self.step(
            SetUserMemoryRegion(slot, flags ^ (LOG * flip_log), gpa, size, uaddr, fd or 0, off)
        )

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        slot, (gpa, _, uaddr, flags, fd, off) = self.pick(data)
        self.step(SetUserMemoryRegion(slot, flags, gpa, 0, uaddr, fd or 0, off))

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data(), how=st.sampled_from(["same", "flags", "resize", "uaddr"]))
    def modify_existing(self, data: st.DataObject, how: str) -> None:
        slot, (gpa, size, uaddr, flags, fd, off) = self.pick(data)
        if how == "flags":
            flags = data.draw(flag_values)
        elif how == "resize":
            size = data.draw(pages(1, 16))
        elif how == "uaddr":
            uaddr = data.draw(st.sampled_from(UADDRS))
        self.step(SetUserMemoryRegion(slot, flags, gpa, size, uaddr, fd or 0, off))

    @precondition(lambda self: len(self.closed) < 2)
    @rule(which=st.integers(0, 1))
    def close_gmem(self, which: int) -> None:
        fd = self.fds[which]
        if fd in self.closed:
            return
        self.gmem.close(fd)
        self.closed.add(fd)

    # -- state agreement -------------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "ref"):
            return
        engine: dict[tuple[int, int], Entry] = {}
        for space in self.spaces:
            ordered = space.by_gfn()
            assert [s.base_gfn for s in ordered] == sorted(s.base_gfn for s in ordered)
            for a, b in zip(ordered, ordered[1:], strict=False):
                assert a.end_gfn <= b.base_gfn  # disjoint within an address space
            for s in space:
                assert space.find(s.base_gfn) is s and space.find(s.end_gfn - 1) is s
                engine[(s.as_id, s.id)] = (
                    s.base_gfn * PAGE,
                    s.npages * PAGE,
                    s.userspace_addr,
                    s.flags,
                    s.guest_memfd,
                    s.guest_memfd_offset,
                )
        assert engine == self.ref
        for fd in self.fds:
            bound = sorted(
                (off // PAGE, size // PAGE, key)
                for key, (_, size, _, flags, bfd, off) in self.ref.items()
                if flags & GMEM and bfd == fd
            )
            assert sorted(self.gmem.files[fd].bindings) == bound


MemslotMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemslotMachine = MemslotMachine.TestCase
