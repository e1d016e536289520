"""Memslots: the slot sets of each address space and the ordered validation of a region update.

`check_region` is KVM_SET_USER_MEMORY_REGION(2) up to the point where the kernel starts changing
state: every check of kvm-memslots.md §2.1 (V1..V20) in the kernel's order, each with its errno.
It builds the change to perform and touches nothing; the VM (vm.py) performs it, zapping for
DELETE/MOVE, and calls `check_arch_prepare` (V21) at the point the kernel does.
"""

from __future__ import annotations

import enum
import errno
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import uapi
from .addr import gfn_to_gpa, gpa_to_gfn, offset_to_page, pages_to_size, size_to_pages
from .dirty import apply_flags
from .errors import KvmError, einval
from .op import Op, operation
from .roots import RootRole
from .zap import flush_memslot, zap_all_fast

if TYPE_CHECKING:
    from .gmem import GmemTable
    from .state import KvmState

_PAGE_MASK = uapi.PAGE_SIZE - 1
_U32_MAX = (1 << 32) - 1
_U64_MAX = uapi.U64_MASK
_V1_FLAGS = int(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY)
_LOG_DIRTY = int(uapi.KVM_MEM_LOG_DIRTY_PAGES)
_READONLY = int(uapi.KVM_MEM_READONLY)
_GUEST_MEMFD = int(uapi.KVM_MEM_GUEST_MEMFD)


class ChangeKind(enum.StrEnum):
    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    NONE = "none"


# The kinds as module constants: naming an enum member on its class is a descriptor call
# (~0.15 µs in 3.11), and the memslot path names several on every call.
_CREATE, _DELETE, _MOVE = ChangeKind.CREATE, ChangeKind.DELETE, ChangeKind.MOVE
_FLAGS_ONLY, _NONE = ChangeKind.FLAGS_ONLY, ChangeKind.NONE
_NEW_LOCATION = (_CREATE, _MOVE)  # the changes the arch prepare hook checks (V21)


@dataclass(slots=True)
class Memslot:
    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int  # the uAPI flags (bits 0-15); kernel-internal state has its own fields below
    userspace_addr: int
    guest_memfd: int | None  # fd of the bound guest_memfd file, None if not a gmem slot
    guest_memfd_offset: int  # bytes
    invalid: bool = False  # KVM_MEMSLOT_INVALID while a delete/move is in flight
    # KVM_MEMSLOT_GMEM_ONLY: the bound file is mmap-able, so every fault (shared included) is
    # served from guest_memfd rather than from userspace_addr.
    gmem_only: bool = False

    @property
    def slot(self) -> int:
        return (self.as_id << 16) | self.id

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def gmem_pgoff(self) -> int:
        return offset_to_page(self.guest_memfd_offset)

    def hva(self, gfn: int) -> int:
        return self.userspace_addr + pages_to_size(gfn - self.base_gfn)

    def gmem_index(self, gfn: int) -> int:
        """Page index in the bound guest_memfd file backing `gfn`."""
        return gfn - self.base_gfn + self.gmem_pgoff

    def to_dict(self) -> dict[str, int]:
        as_id, id, fd = self.as_id, self.id, self.guest_memfd
        return {
            "slot": (as_id << 16) | id,  # `slot`, without a property call (every answer)
            "as_id": as_id,
            "id": id,
            "flags": self.flags,
            "guest_phys_addr": gfn_to_gpa(self.base_gfn),
            "memory_size": pages_to_size(self.npages),
            "userspace_addr": self.userspace_addr,
            "guest_memfd": fd if fd is not None else 0,
            "guest_memfd_offset": self.guest_memfd_offset,
            "base_gfn": self.base_gfn,
            "npages": self.npages,
        }


class MemslotSet:
    """The slots of one address space, kept sorted by base_gfn (they never overlap)."""

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        self.generation = as_id  # vm.py adds the VM's address-space count per swap
        self._by_id: dict[int, Memslot] = {}
        self._starts: list[int] = []  # base_gfn of _ordered[i]
        self._ordered: list[Memslot] = []

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, id: object) -> bool:
        return id in self._by_id

    def __iter__(self) -> Iterator[Memslot]:
        return iter(sorted(self._by_id.values(), key=lambda s: s.id))

    def by_gfn(self) -> list[Memslot]:
        """Slots in guest-physical order."""
        return list(self._ordered)

    def get(self, id: int) -> Memslot | None:
        return self._by_id.get(id)

    def find(self, gfn: int) -> Memslot | None:
        """The slot containing `gfn` (invalid slots included: the caller decides)."""
        i = bisect_right(self._starts, gfn) - 1
        if i >= 0 and gfn < self._ordered[i].end_gfn:
            return self._ordered[i]
        return None

    def overlapping(self, base_gfn: int, npages: int) -> list[Memslot]:
        if npages <= 0:
            return []
        end = base_gfn + npages
        ordered = self._ordered
        i = bisect_right(self._starts, base_gfn) - 1
        if i < 0 or ordered[i].base_gfn + ordered[i].npages <= base_gfn:
            i += 1
        # The slots from i on start in order: those starting before `end` overlap.
        return ordered[i : bisect_left(self._starts, end, i)]

    def total_pages(self) -> int:
        return sum(s.npages for s in self._ordered)

    def install(self, slot: Memslot) -> None:
        # The set validates itself: a caller that skipped check_region still cannot corrupt it.
        id, base, npages = slot.id, slot.base_gfn, slot.npages
        if slot.as_id != self.as_id:
            raise einval(f"slot of address space {slot.as_id} installed in {self.as_id}")
        if npages <= 0:
            raise einval("a memslot has at least one page")
        if id in self._by_id:
            raise KvmError(errno.EEXIST, f"slot id {id} already exists")
        # The slots are sorted and disjoint: only the neighbours of the insertion point can
        # overlap the new one.
        starts, ordered = self._starts, self._ordered
        i = bisect_left(starts, base)
        if (i > 0 and ordered[i - 1].base_gfn + ordered[i - 1].npages > base) or (
            i < len(starts) and starts[i] < base + npages
        ):
            raise KvmError(errno.EEXIST, f"slot {id} overlaps another slot")
        starts.insert(i, base)
        ordered.insert(i, slot)
        self._by_id[id] = slot

    def remove(self, id: int) -> Memslot:
        slot = self._by_id.pop(id, None)
        if slot is None:
            raise einval(f"no slot {id} in address space {self.as_id}")
        i = bisect_left(self._starts, slot.base_gfn)
        del self._starts[i]
        del self._ordered[i]
        return slot


@operation("set_user_memory_region")
class SetUserMemoryRegion(Op):
    """KVM_SET_USER_MEMORY_REGION2: struct kvm_userspace_memory_region2 as a client sent it
    (checked by `check_region`); memory_size 0 deletes the slot. Absent optional fields are
    zero, as in a zeroed struct."""

    slot: int
    flags: int = 0
    guest_phys_addr: int = 0
    memory_size: int = 0
    userspace_addr: int = 0
    guest_memfd: int | None = 0
    guest_memfd_offset: int = 0


@dataclass(slots=True)
class MemslotChange:
    kind: ChangeKind
    old: Memslot | None  # the slot as it is now (None for CREATE)
    new: Memslot | None  # the slot to install (None for DELETE; `old` itself for NONE)


def _fit(value: object, max_value: int, name: str) -> int:
    """A struct field: what does not fit its C type cannot be expressed, so it is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_value:
        raise einval(f"{name} does not fit its field: {value!r}")
    return value


_Struct = tuple[int, int, int, int, int, int, int]


def _struct(req: SetUserMemoryRegion, v2: bool) -> _Struct:
    """V1, the struct copy: (slot, flags, guest_phys_addr, memory_size, userspace_addr,
    guest_memfd, guest_memfd_offset), each as its C field holds it; the v1 struct has no
    guest_memfd fields (0). JSON can express values no C field holds: the first field that
    does not fit is refused."""
    s, f, g, n, u = req.slot, req.flags, req.guest_phys_addr, req.memory_size, req.userspace_addr
    fd, off = (req.guest_memfd, req.guest_memfd_offset) if v2 else (0, 0)
    # Plain JSON integers that fit (the usual request) pass in one test.
    if (
        type(s) is type(f) is type(g) is type(n) is type(u) is type(fd) is type(off) is int
        and 0 <= s <= _U32_MAX
        and 0 <= f <= _U32_MAX
        and 0 <= g <= _U64_MAX
        and 0 <= n <= _U64_MAX
        and 0 <= u <= _U64_MAX
        and 0 <= fd <= _U32_MAX
        and 0 <= off <= _U64_MAX
    ):
        return s, f, g, n, u, fd, off
    return (
        _fit(s, _U32_MAX, "slot"),
        _fit(f, _U32_MAX, "flags"),
        _fit(g, _U64_MAX, "guest_phys_addr"),
        _fit(n, _U64_MAX, "memory_size"),
        _fit(u, _U64_MAX, "userspace_addr"),
        _fit(fd, _U32_MAX, "guest_memfd"),
        _fit(off, _U64_MAX, "guest_memfd_offset"),
    )


def _check_flags(flags: int, vm_type: int) -> None:
    """V5: the flags valid for this VM and request."""
    valid = _LOG_DIRTY | _GUEST_MEMFD
    if flags & _GUEST_MEMFD:
        valid &= ~_LOG_DIRTY
    if not uapi.vm_has_protected_state(vm_type) and not flags & _GUEST_MEMFD:
        valid |= _READONLY
    if flags & ~valid:
        raise einval(f"flags {flags:#x} not valid for this VM/request (valid {valid:#x})")


def check_region(
    req: SetUserMemoryRegion,
    *,
    vm_type: int,
    spaces: list[MemslotSet],
    gmem: GmemTable,
    user_addr_end: int,
    v2: bool = True,
) -> MemslotChange:
    """Validate a region update in the kernel's order (V1..V20) and say what it would do."""
    # V1: the struct copy.
    slot_arg, flags, gpa, size, uaddr, gmem_fd, gmem_offset = _struct(req, v2)

    # V2: the v1 ioctl knows only LOG_DIRTY_PAGES and READONLY.
    if not v2 and flags & ~_V1_FLAGS:
        raise einval("KVM_SET_USER_MEMORY_REGION accepts only LOG_DIRTY_PAGES|READONLY")

    as_id, id = slot_arg >> 16, slot_arg & 0xFFFF
    # V3: internal slot ids are unreachable from userspace (the as_id bits are ignored here).
    if id >= uapi.KVM_USER_MEM_SLOTS:
        raise einval(f"slot id {id} >= KVM_USER_MEM_SLOTS ({uapi.KVM_USER_MEM_SLOTS})")

    # V5: flags valid for this VM (applies to deletes too); no flag is always valid.
    if flags:
        _check_flags(flags, vm_type)

    # V6-V8: alignment and the user address range (checked even for deletes).
    if size & _PAGE_MASK:
        raise einval("memory_size is not a multiple of the page size")
    if gpa & _PAGE_MASK:
        raise einval("guest_phys_addr is not page aligned")
    if uaddr & _PAGE_MASK:
        raise einval("userspace_addr is not page aligned")
    if uaddr + size > user_addr_end:
        raise einval("[userspace_addr, +memory_size) is not inside the user address space")

    # V9: guest_memfd offset.
    if flags & _GUEST_MEMFD:
        if gmem_offset & _PAGE_MASK:
            raise einval("guest_memfd_offset is not page aligned")
        if gmem_offset + size > _U64_MAX:
            raise einval("guest_memfd_offset + memory_size wraps around")

    # V10: address space and slot id limits (every VM has address space 0).
    if as_id and as_id >= uapi.nr_address_spaces(vm_type):
        raise einval(f"as_id {as_id} not available for this VM type")
    if id >= uapi.KVM_MEM_SLOTS_NUM:
        raise einval("slot id >= KVM_MEM_SLOTS_NUM")

    # V11, V12.
    if gpa + size > _U64_MAX:
        raise einval("guest_phys_addr + memory_size wraps around")
    npages = size_to_pages(size)
    if npages > uapi.KVM_MEM_MAX_NR_PAGES:
        raise einval("memory_size exceeds KVM_MEM_MAX_NR_PAGES")

    # V13, V14: DELETE.
    space = spaces[as_id]
    old = space.get(id)
    if size == 0:
        if old is None:
            raise einval(f"delete of slot {slot_arg:#x}, which does not exist")
        return MemslotChange(_DELETE, old, None)

    # V15-V17: CREATE or a modification of an existing slot.
    base_gfn = gpa_to_gfn(gpa)
    if old is None:
        # V16's total-pages overflow is unreachable: 2 spaces x 32764 slots x 2^31 pages < 2^64.
        kind = _CREATE
        new = Memslot(as_id, id, base_gfn, npages, flags, uaddr, None, 0)
    else:
        if flags & _GUEST_MEMFD:
            raise einval("guest_memfd slots are immutable: they can only be deleted")
        if uaddr != old.userspace_addr:
            raise einval("userspace_addr of an existing slot cannot change")
        if npages != old.npages:
            raise einval("an existing slot cannot be resized")
        # READONLY cannot be toggled; nor GUEST_MEMFD (Dec 2025 fix: dropping it was a UAF).
        if (flags ^ old.flags) & (_READONLY | _GUEST_MEMFD):
            raise einval("READONLY/GUEST_MEMFD cannot be toggled on an existing slot")
        if base_gfn != old.base_gfn:
            kind = _MOVE
        elif flags != old.flags:
            kind = _FLAGS_ONLY
        else:
            return MemslotChange(_NONE, old, old)  # identical: nothing happens at all
        new = replace(old, base_gfn=base_gfn, flags=flags, invalid=False)

    # V18: overlap with another slot of the same address space (the moved slot excepted).
    for other in space.overlapping(base_gfn, npages):
        if other.id != id:
            raise KvmError(errno.EEXIST, f"range overlaps slot {other.slot:#x}")

    # V20: guest_memfd binding rules (only a CREATE can get here with GUEST_MEMFD).
    if flags & _GUEST_MEMFD:
        file = gmem.check_bind(gmem_fd, gmem_offset, size)
        new.guest_memfd = gmem_fd
        new.guest_memfd_offset = gmem_offset
        new.gmem_only = bool(file.flags & uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP)
    return MemslotChange(kind, old, new)


def check_arch_prepare(change: MemslotChange, *, max_gfn: int, gfn_direct_bits: int) -> None:
    """V21, the x86 prepare hook's checks for the new location of a CREATE or MOVE."""
    if change.kind not in _NEW_LOCATION:
        return
    new = change.new
    assert new is not None
    last = new.base_gfn + new.npages - 1
    if last > max_gfn:
        raise einval(f"last gfn {last:#x} beyond the max gfn {max_gfn:#x}")
    # Only the last gfn is tested for the TDX shared bit, as in the kernel.
    if last & gfn_direct_bits:
        raise einval(f"last gfn {last:#x} has the TDX shared bit (an alias)")


# ------------------------------------------------------------------ KVM_SET_USER_MEMORY_REGION2
# A memslot answer's "change" as a plain str (an enum's `.value` is a descriptor call).
_CHANGE_NAMES = {k: k.value for k in ChangeKind}
_CREATED, _DELETED = _CHANGE_NAMES[_CREATE], _CHANGE_NAMES[_DELETE]


def set_user_memory_region(vm: KvmState, op: SetUserMemoryRegion) -> dict[str, Any]:
    change = check_region(
        op,
        vm_type=vm.vm_type,
        spaces=vm.spaces,
        gmem=vm.gmem,
        user_addr_end=vm.user_addr_end,
    )
    kind, old, new = change.kind, change.old, change.new
    if kind is _CREATE:
        check_arch_prepare(change, max_gfn=vm.max_gfn, gfn_direct_bits=vm.gfn_direct_bits)
        assert new is not None
        if new.guest_memfd is not None:
            vm.gmem.bind(new.guest_memfd, new.guest_memfd_offset, new.npages, (new.as_id, new.id))
        space = vm.spaces[new.as_id]
        space.install(new)
        _swap(vm, space)
        if new.flags & _LOG_DIRTY:
            vm.alloc_dirty(new)
        return {"change": _CREATED, "memslot": _answer_slot(vm, new), "zap": None}
    if kind is _NONE:
        return {"change": _CHANGE_NAMES[kind], "memslot": _answer_slot(vm, old), "zap": None}
    if kind is _FLAGS_ONLY:
        assert old is not None and new is not None
        space = vm.spaces[old.as_id]
        space.remove(old.id)
        space.install(new)
        _swap(vm, space)
        zap = apply_flags(vm, old, new)
        return {"change": _CHANGE_NAMES[kind], "memslot": _answer_slot(vm, new), "zap": zap}
    assert old is not None
    return _delete_or_move(vm, change, old, new)


def _delete_or_move(
    vm: KvmState, change: MemslotChange, old: Memslot, new: Memslot | None
) -> dict[str, Any]:
    # DELETE and MOVE: publish the INVALID slot, flush it from the MMU, then finish.
    space = vm.spaces[old.as_id]
    old.invalid = True
    _swap(vm, space)
    if change.kind is _DELETE:
        zap = flush_memslot(vm, old, "memslot_delete")
        space.remove(old.id)
        key = (old.as_id, old.id)
        vm.free_dirty(key)
        if old.guest_memfd is not None:
            vm.gmem.unbind(old.guest_memfd, key)
        _swap(vm, space)
        return {"change": _DELETED, "memslot": None, "zap": zap}
    assert new is not None
    zap = flush_memslot(vm, old, "memslot_move")
    try:
        check_arch_prepare(change, max_gfn=vm.max_gfn, gfn_direct_bits=vm.gfn_direct_bits)
    except KvmError as e:
        # The kernel restores the old slot; the zap is not undone (kvm-memslots.md §2.1 V21).
        old.invalid = False
        _swap(vm, space)
        e.state_changed = True
        raise
    space.remove(old.id)
    space.install(new)
    key = (old.as_id, old.id)
    if not new.flags & _LOG_DIRTY:
        vm.free_dirty(key)
    elif key not in vm.dirty:
        vm.alloc_dirty(new)
    _swap(vm, space)
    moved = _answer_slot(vm, new)
    return {"change": _CHANGE_NAMES[change.kind], "memslot": moved, "zap": zap}


def _answer_slot(vm: KvmState, slot: Memslot | None) -> dict[str, Any] | None:
    """A memslot answer's view of the slot, unless the caller discards the answer."""
    return slot_view(vm, slot) if vm.answering else None


def slot_view(vm: KvmState, slot: Memslot | None) -> dict[str, Any] | None:
    if slot is None:
        return None
    d: dict[str, Any] = slot.to_dict()
    d["flag_names"] = list(_mem_flag_names(slot.flags))
    d["mapped"] = slot_mapped(vm, slot)
    d["dirty_logging"] = (slot.as_id, slot.id) in vm.dirty
    return d


def _mem_flag_names(flags: int) -> tuple[str, ...]:
    """A slot's flag names (`uapi.flag_names`), from a table of every combination."""
    names = _MEM_FLAG_NAMES.get(flags)
    return names if names is not None else tuple(uapi.flag_names(uapi.MemFlag, flags))


_MEM_FLAG_NAMES = {
    f: tuple(uapi.flag_names(uapi.MemFlag, f)) for f in range(1 << len(uapi.MemFlag))
}
_NOTHING_MAPPED = {"shared": 0, "private": 0, "total": 0}  # copied, never handed out
_DIRECT, _MIRROR = RootRole.DIRECT, RootRole.MIRROR


def slot_mapped(vm: KvmState, slot: Memslot) -> dict[str, int]:
    """Present leaves inside the slot, in 4 KiB pages, per root role."""
    if not vm.mmu.roots:  # nothing mapped yet (a VM whose vCPUs never ran)
        return _NOTHING_MAPPED.copy()
    out = {"shared": 0, "private": 0}
    for root in vm.mmu.roots.values():  # any order: the counts are summed
        if root.as_id != slot.as_id:
            continue
        bits = vm.gfn_direct_bits if root.role is _DIRECT else 0
        n = vm.mmu.mapped_pages(root, slot.base_gfn | bits, slot.end_gfn | bits)
        if root.role is _MIRROR:
            out["private"] += n
        elif vm.has_private_mem and not vm.is_tdx:
            priv = vm.mmu.mapped_pages(root, slot.base_gfn, slot.end_gfn, gmem=True)
            out["private"] += priv
            out["shared"] += n - priv
        else:
            out["shared"] += n
    out["total"] = out["shared"] + out["private"]
    return out


def _swap(vm: KvmState, space: MemslotSet) -> None:
    """A new memslot array is published: generation += nr_as (kvm-memslots.md §2.3); if the
    MMIO generation wraps to 0, a fast zap (kvm-memslots.md §5.4)."""
    nr_as = vm.nr_as
    space.generation += nr_as
    if not space.generation & ~(nr_as - 1) & ((1 << 19) - 1):
        vm.stats_extra["memslot_generation_wraps"] += 1
        zap_all_fast(vm, "mmio_gen_wrap")
