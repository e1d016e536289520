"""Random KVM_SET_USER_MEMORY_REGION2 sequences: a VM (Vm.apply, the path the service takes)
against a tiny reference model.

The reference is a dict slot key -> (gpa, size, uaddr, flags, fd, offset), checked with plain
linear scans, and the limits and VM-type rules are the spec's numbers typed here
(kvm-memslots.md §1, §2.1; kvm-private-tdx.md §8.11), never read from the engine. VM and
model must agree on every outcome (errno or change kind) and on the state after every step.
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.engine import Vm
from app.engine.errors import KvmError
from app.engine.memslots import SetUserMemoryRegion
from app.engine.ops import parse

# The spec's numbers (kvm-memslots.md §1.1-§1.3), typed rather than imported from the engine.
PAGE = 4096
LOG, RO, GMEM = 1, 2, 4
U64 = (1 << 64) - 1
USER_END = 0x0000_7FFF_FFFF_F000  # TASK_SIZE_MAX with 4-level paging
MAX_GFN = (1 << 40) - 1  # host MAXPHYADDR 52
USER_MEM_SLOTS = 32764  # KVM_USER_MEM_SLOTS on x86
MAX_NR_PAGES = (1 << 31) - 1  # KVM_MEM_MAX_NR_PAGES
DEFAULT, SW_PROTECTED, TDX = 0, 1, 5  # KVM_X86_*_VM (Intel host)
VM_TYPES = [DEFAULT, SW_PROTECTED, TDX]
SMM_ADDRESS_SPACES = {DEFAULT: 2, SW_PROTECTED: 1, TDX: 1}  # private memory: no SMM
TDX_SHARED_GFN = 1 << 35  # a 4-level TD's shared bit (GPA bit 47) as a gfn bit
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
        self.nr_as = SMM_ADDRESS_SPACES[vm_type]
        self.vm = Vm.create(vm_type, 1)
        self.fds = [
            self.vm.apply(parse("create_guest_memfd", {"size": n * PAGE}))["fd"] for n in (48, 16)
        ]
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
            id >= USER_MEM_SLOTS,
            flags not in allowed,
            size % PAGE != 0 or gpa % PAGE != 0 or uaddr % PAGE != 0,
            uaddr + size > USER_END,
            gm and (off % PAGE != 0 or off + size > U64),
            as_id >= self.nr_as,
            gpa + size > U64,
            size // PAGE > MAX_NR_PAGES,
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
        last = (gpa + size) // PAGE - 1
        if last > MAX_GFN:
            return errno.EINVAL  # V21 (arch prepare)
        if self.vm_type == TDX and last & TDX_SHARED_GFN:
            return errno.EINVAL  # V21: only the last gfn is tested for the shared bit
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

    # -- the VM, through the one entry point the service uses --------------------------------
    def engine(self, r: SetUserMemoryRegion) -> int | str:
        args = {
            "slot": r.slot,
            "flags": r.flags,
            "guest_phys_addr": r.guest_phys_addr,
            "memory_size": r.memory_size,
            "userspace_addr": r.userspace_addr,
            "guest_memfd": r.guest_memfd,
            "guest_memfd_offset": r.guest_memfd_offset,
        }
        try:
            out = self.vm.apply(parse("set_user_memory_region", args))
        except KvmError as e:
            assert e.state_changed is False
            return e.errno
        return str(out["change"])

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
        self.vm.apply(parse("gmem_close", {"fd": fd}))
        self.closed.add(fd)

    # -- state agreement -------------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        engine: dict[tuple[int, int], Entry] = {}
        for m in self.vm.memslots():
            gm = bool(m["flags"] & GMEM)
            engine[(m["as_id"], m["id"])] = (
                m["guest_phys_addr"],
                m["memory_size"],
                m["userspace_addr"],
                m["flags"],
                m["guest_memfd"] if gm else None,
                m["guest_memfd_offset"] if gm else 0,
            )
        assert engine == self.ref
        # Disjoint within an address space, and every page found by lookup in its own slot.
        for as_id in range(self.nr_as):
            spans = sorted((g, g + s) for (a, _), (g, s, *_r) in self.ref.items() if a == as_id)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end <= start
        files = {f["fd"]: f for f in self.vm.guest_memfds()}
        for fd in self.fds:
            bound = sorted(
                (off, size // PAGE, as_id, id)
                for (as_id, id), (_, size, _, flags, bfd, off) in self.ref.items()
                if flags & GMEM and bfd == fd
            )
            got = sorted(
                (b["offset"], b["npages"], b["as_id"], b["id"]) for b in files[fd]["bindings"]
            )
            assert got == bound
            assert files[fd]["closed"] is (fd in self.closed)


MemslotMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemslotMachine = MemslotMachine.TestCase
