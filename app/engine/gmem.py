"""guest_memfd files: creation rules, fallocate rules, bindings to memslots, allocated pages.

Page state is kept per run (an IntervalSet of allocated page indexes), so a file of millions of
pages costs nothing until it is used. Each file owns a contiguous, never reused pfn range handed
out by the table's bump allocator: a gmem pfn is `file.base_pfn + page index`.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import uapi
from .addr import offset_to_page, page_to_offset, pages_to_size, size_to_pages
from .errors import MAX_DATA_BYTES, KvmError, check_u64, einval, hex_bytes
from .intervals import IntervalSet
from .op import Op, operation
from .zap import gmem_invalidate

if TYPE_CHECKING:
    from .state import KvmState

# pfn layout of the simulated host: host (HVA-backed) pages < 1<<35, page tables in
# [1<<36, 1<<38), guest_memfd pages from 1<<38 up to the 40-bit pfn field of an EPT entry.
GMEM_PFN_BASE = 1 << 38
GMEM_PFN_LIMIT = size_to_pages(1 << uapi.HOST_MAXPHYADDR)
FIRST_GMEM_FD = 3  # after stdin/stdout/stderr; fds are never reused within a VM
MAX_LISTED_RUNS = 256

# fallocate(2) mode bits (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_NO_HIDE_STALE = 0x04
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80
FALLOC_FL_MODE_MASK = (
    FALLOC_FL_PUNCH_HOLE
    | FALLOC_FL_COLLAPSE_RANGE
    | FALLOC_FL_ZERO_RANGE
    | FALLOC_FL_INSERT_RANGE
    | FALLOC_FL_UNSHARE_RANGE
    | FALLOC_FL_WRITE_ZEROES
)
# The API's mode names; KVM insists on KEEP_SIZE, so both carry it.
FALLOC_MODES = {
    "allocate": FALLOC_FL_KEEP_SIZE,
    "punch_hole": FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
}

_PAGE_MASK = uapi.PAGE_SIZE - 1
_LOFF_MAX = (1 << 63) - 1
_ZERO_PAGE = bytes(uapi.PAGE_SIZE)

Binding = tuple[int, int, tuple[int, int]]  # (first page index, npages, (as_id, slot id))


def supported_gmem_flags(vm_type: int | None) -> int:
    """KVM_CAP_GUEST_MEMFD_FLAGS: MMAP for every VM; INIT_SHARED only where memory attributes
    cannot make gmem memory private (VMs without private memory) and on /dev/kvm (None)."""
    flags = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP)
    if vm_type is None or not uapi.vm_has_private_mem(vm_type):
        flags |= int(uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)
    return flags


@dataclass(eq=False)
class GmemFile:
    fd: int
    size: int  # bytes, fixed at creation (the file cannot be resized)
    flags: int
    owner_vm: object  # identity token of the VM that created it
    base_pfn: int  # pfn of page 0
    allocated: IntervalSet = field(default_factory=IntervalSet)  # page indexes with a folio
    bindings: list[Binding] = field(default_factory=list)  # sorted by first page index
    contents: dict[int, bytes] = field(default_factory=dict)  # written pages only
    closed: bool = False

    @property
    def npages(self) -> int:
        return size_to_pages(self.size)

    @property
    def allocated_pages(self) -> int:
        return self.allocated.total()

    def pfn(self, index: int) -> int:
        return self.base_pfn + index

    def allocate(self, first: int, count: int) -> int:
        """Give pages [first, first+count) a folio (clamped to the file); returns the new ones."""
        end = min(first + count, self.npages)
        if first >= end:
            return 0
        new = (end - first) - self.allocated.overlap(first, end)
        self.allocated.add(first, end)
        return new

    def punch(self, first: int, count: int) -> int:
        """Free pages [first, first+count); returns how many were allocated. Contents go too."""
        end = min(first + count, self.npages)
        if first >= end:
            return 0
        freed = self.allocated.remove(first, end)
        if len(self.contents) <= end - first:
            for idx in [i for i in self.contents if first <= i < end]:
                del self.contents[idx]
        else:
            for idx in range(first, end):
                self.contents.pop(idx, None)
        return freed

    def is_allocated(self, first: int, count: int) -> np.ndarray:
        """bool[count]: which of pages [first, first+count) are allocated (one slice per run)."""
        mask = np.zeros(max(count, 0), dtype=bool)
        end = first + count
        i = bisect_right(self.allocated.ends, first)
        j = bisect_left(self.allocated.starts, end)
        for k in range(i, j):
            s = max(self.allocated.starts[k], first)
            e = min(self.allocated.ends[k], end)
            mask[s - first : e - first] = True
        return mask

    def bindings_in(self, first: int, end: int) -> list[Binding]:
        """Bindings intersecting page range [first, end), clipped to it."""
        out: list[Binding] = []
        for start, n, key in self.bindings:
            s, e = max(start, first), min(start + n, end)
            if s < e:
                out.append((s, e - s, key))
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at [offset, offset+length) as they are now (unwritten pages read as zeroes)."""
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            idx, off = divmod(pos, uapi.PAGE_SIZE)
            n = min(uapi.PAGE_SIZE - off, end - pos)
            out += self.contents.get(idx, _ZERO_PAGE)[off : off + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> int:
        """Store `data` at `offset` (touching a page allocates it); returns new pages."""
        if not data:
            return 0
        first = offset_to_page(offset)
        last = offset_to_page(offset + len(data) - 1)
        new = self.allocate(first, last - first + 1)
        pos = 0
        while pos < len(data):
            idx, off = divmod(offset + pos, uapi.PAGE_SIZE)
            n = min(uapi.PAGE_SIZE - off, len(data) - pos)
            page = bytearray(self.contents.get(idx, _ZERO_PAGE))
            page[off : off + n] = data[pos : pos + n]
            self.contents[idx] = bytes(page)
            pos += n
        return new

    def release(self) -> int:
        """The last reference went away: every page is freed. Returns pages freed."""
        freed = self.allocated.total()
        self.allocated = IntervalSet()
        self.contents.clear()
        return freed

    def to_dict(self) -> dict[str, object]:
        return {
            "fd": self.fd,
            "size": self.size,
            "flags": self.flags,
            "flag_names": uapi.flag_names(uapi.GmemFlag, self.flags),
            "base_pfn": self.base_pfn,
            "allocated_pages": self.allocated_pages,
            # Runs of allocated pages, bounded: a fragmented file must not make huge answers.
            "allocated": self.allocated.to_list()[:MAX_LISTED_RUNS],
            "allocated_runs": len(self.allocated),
            "bindings": [
                {"offset": page_to_offset(start), "npages": n, "as_id": key[0], "id": key[1]}
                for start, n, key in self.bindings
            ],
            "closed": self.closed,
        }


class GmemTable:
    """The guest_memfd files a VM created, by fd (closed files stay listed, marked closed)."""

    def __init__(self, owner: object = None, first_fd: int = FIRST_GMEM_FD) -> None:
        self.owner = owner
        self.files: dict[int, GmemFile] = {}
        self.first_fd = first_fd
        self.next_fd = first_fd
        self.next_pfn = GMEM_PFN_BASE

    def __iter__(self) -> Iterator[GmemFile]:
        return iter(self.files[fd] for fd in sorted(self.files))

    def open_files(self) -> list[GmemFile]:
        return [f for f in self if not f.closed]

    # -- KVM_CREATE_GUEST_MEMFD -----------------------------------------------------------
    def create(self, size: object, flags: object, *, vm_type: int) -> GmemFile:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= uapi.U64_MASK:
            raise einval(f"size does not fit a u64: {size!r}")
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise einval(f"flags must be an integer: {flags!r}")
        if not 0 <= flags <= uapi.U64_MASK:
            raise einval(f"flags does not fit a u64: {flags!r}")
        supported = supported_gmem_flags(vm_type)
        if flags & ~supported:
            raise einval(f"guest_memfd flags {flags:#x} not supported (supported {supported:#x})")
        # size is a loff_t in the kernel: >= 2^63 is negative there.
        if size == 0 or size > _LOFF_MAX or size & _PAGE_MASK:
            raise einval("size must be positive and page aligned")
        npages = size_to_pages(size)
        if npages > GMEM_PFN_LIMIT - self.next_pfn:
            # A limit of the simulator, not of KVM: every page needs a distinct 40-bit pfn.
            raise KvmError(errno.ENOMEM, "guest_memfd pfn space of this VM exhausted")
        file = GmemFile(
            fd=self.next_fd, size=size, flags=flags, owner_vm=self.owner, base_pfn=self.next_pfn
        )
        self.next_fd += 1
        self.next_pfn += npages
        self.files[file.fd] = file
        return file

    def get(self, fd: object) -> GmemFile:
        """An open file by fd, else EBADF (as any syscall on an fd that is not open)."""
        file = self.files.get(fd) if isinstance(fd, int) and not isinstance(fd, bool) else None
        if file is None or file.closed:
            raise KvmError(errno.EBADF, f"fd {fd!r} is not an open guest_memfd")
        return file

    def lookup(self, fd: int | None) -> GmemFile | None:
        """The file a memslot recorded, open or closed; None if there never was one."""
        return self.files.get(fd) if fd is not None else None

    def pfn_owner(self, pfn: int) -> tuple[GmemFile, int] | None:
        """The file and page index a gmem pfn belongs to (for audit)."""
        for file in self.files.values():
            if file.base_pfn <= pfn < file.base_pfn + file.npages:
                return file, pfn - file.base_pfn
        return None

    # -- fallocate(2) ---------------------------------------------------------------------
    def check_fallocate(
        self, fd: object, mode: object, offset: object, length: object
    ) -> tuple[GmemFile, bool, int, int]:
        """fallocate(2) on a guest_memfd, argument rules in order (VFS, then KVM).

        Returns (file, punch_hole, first page, page count); the range is not clamped.
        """
        file = self.get(fd)
        if isinstance(mode, str):
            if mode not in FALLOC_MODES:
                raise einval(f"unknown fallocate mode {mode!r}")
            mode = FALLOC_MODES[mode]
        for name, value in (("mode", mode), ("offset", offset), ("len", length)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise einval(f"{name} must be an integer: {value!r}")
        assert isinstance(mode, int) and isinstance(offset, int) and isinstance(length, int)
        # vfs_fallocate: offset and len are loff_t.
        if offset < 0 or length <= 0 or offset > _LOFF_MAX or length > _LOFF_MAX:
            raise einval("offset must be >= 0 and len > 0")
        if mode & ~(FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE):
            raise KvmError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unknown bits")
        kind = mode & FALLOC_FL_MODE_MASK
        if kind in (0, FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_ZERO_RANGE):
            pass
        elif kind == FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise KvmError(errno.EOPNOTSUPP, "PUNCH_HOLE requires KEEP_SIZE")
        elif kind in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_WRITE_ZEROES):
            if mode & FALLOC_FL_KEEP_SIZE:
                raise KvmError(errno.EOPNOTSUPP, "this fallocate mode excludes KEEP_SIZE")
        else:
            raise KvmError(errno.EOPNOTSUPP, "fallocate modes are exclusive")
        if offset + length > _LOFF_MAX:
            raise KvmError(errno.EFBIG, "offset + len overflows loff_t")
        # kvm_gmem_fallocate.
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, "guest_memfd requires FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, "guest_memfd supports only allocate and punch hole")
        if offset & _PAGE_MASK or length & _PAGE_MASK:
            raise einval("offset and len must be page aligned")
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        if not punch and offset + length > file.size:
            raise einval("allocation beyond the end of the file (guest_memfd is not resizable)")
        return file, punch, offset_to_page(offset), size_to_pages(length)

    # -- memslot bindings -----------------------------------------------------------------
    def check_bind(self, fd: int, offset: int, size: int, *, owner: object = None) -> GmemFile:
        """kvm_gmem_bind's rules (V20): EBADF, then EINVAL, then EEXIST. Changes nothing.

        `owner` is the binding VM's token (default: this table's owner).
        """
        if isinstance(fd, int) and 0 <= fd < self.first_fd:
            # stdin/stdout/stderr are open in any VMM, but they are not guest_memfd files.
            raise einval(f"fd {fd} is not a guest_memfd")
        file = self.get(fd)
        if file.owner_vm != (self.owner if owner is None else owner):
            raise einval("guest_memfd belongs to another VM")
        if offset > _LOFF_MAX:  # negative as a loff_t
            raise einval("guest_memfd_offset is negative as a file offset")
        if offset & _PAGE_MASK:
            raise einval("guest_memfd_offset is not page aligned")
        if offset + size > file.size:
            raise einval("guest_memfd range extends beyond the end of the file")
        first = offset_to_page(offset)
        end = first + size_to_pages(size)
        for start, n, key in file.bindings:
            if start < end and first < start + n:
                raise KvmError(
                    errno.EEXIST, f"guest_memfd pages already bound to slot {key[0]}:{key[1]}"
                )
        return file

    def bind(self, fd: int, offset: int, npages: int, key: tuple[int, int]) -> GmemFile:
        file = self.check_bind(fd, offset, pages_to_size(npages), owner=None)
        entry = (offset_to_page(offset), npages, key)
        file.bindings.insert(bisect_left(file.bindings, entry), entry)
        return file

    def unbind(self, fd: int | None, key: tuple[int, int]) -> None:
        """Drop the slot's binding; a no-op when the file is gone (the kernel checks too)."""
        file = self.lookup(fd)
        if file is not None:
            file.bindings = [b for b in file.bindings if b[2] != key]

    # -- close(2) -------------------------------------------------------------------------
    def close(self, fd: object) -> GmemFile:
        """Release the file: its pages are freed. Its bindings are left for the caller to zap
        (the slots remain, their private faults now fail) and to unbind when slots go."""
        file = self.get(fd)
        file.closed = True
        file.release()
        return file


@operation("create_guest_memfd")
class CreateGuestMemfd(Op):
    """KVM_CREATE_GUEST_MEMFD."""

    size: int
    flags: int = 0


@operation("gmem_fallocate")
class GmemFallocate(Op):
    """fallocate() on a guest_memfd: allocate, or punch a hole (and invalidate)."""

    fd: int
    mode: int
    offset: int
    len: int


@operation("gmem_close")
class GmemClose(Op):
    """The last reference to a guest_memfd goes: every private mapping of it is zapped."""

    fd: int


@operation("gmem_write")
class GmemWrite(Op):
    """A write through the mmap() of an MMAP | INIT_SHARED guest_memfd."""

    fd: int
    offset: int
    data: str


def create_guest_memfd(vm: KvmState, op: CreateGuestMemfd) -> dict[str, Any]:
    size, flags = op.size, op.flags
    return vm.gmem.create(size, flags, vm_type=vm.vm_type).to_dict()


def gmem_fallocate(vm: KvmState, op: GmemFallocate) -> dict[str, Any]:
    fd, mode, offset, len = op.fd, op.mode, op.offset, op.len
    file, punch, first, count = vm.gmem.check_fallocate(fd, mode, offset, len)
    if not punch:
        return {"allocated": file.allocate(first, count), "zap": None}
    zap = gmem_invalidate(vm, file, first, first + count, "punch_hole")
    return {"freed": file.punch(first, count), "zap": zap}


def gmem_close(vm: KvmState, op: GmemClose) -> dict[str, Any]:
    fd = op.fd
    file = vm.gmem.get(fd)
    zap = gmem_invalidate(vm, file, 0, file.npages, "gmem_close")
    vm.gmem.close(fd)
    return {"zap": zap}


def gmem_write(vm: KvmState, op: GmemWrite) -> dict[str, Any]:
    fd, offset, data = op.fd, op.offset, op.data
    file = _mappable(vm, fd)
    payload = hex_bytes(data)
    if len(payload) > MAX_DATA_BYTES:
        raise KvmError(errno.E2BIG, "write at most 1 MiB at once")
    off = check_u64(offset, "offset")
    if off + len(payload) > file.size:
        raise einval("write beyond the end of the file")
    file.write(off, payload)
    return {"written": len(payload)}


def gmem_read(vm: KvmState, fd: object, offset: object, len: object) -> dict[str, Any]:
    file = _mappable(vm, fd)
    off, n = check_u64(offset, "offset"), check_u64(len, "len")
    if n > MAX_DATA_BYTES:
        raise KvmError(errno.E2BIG, "read at most 1 MiB at once")
    if off + n > file.size:
        raise einval("read beyond the end of the file")
    return {"data": file.read(off, n).hex()}


def _mappable(vm: KvmState, fd: object) -> GmemFile:
    file = vm.gmem.get(fd)
    if not file.flags & uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP or file.closed:
        # mmap() of a guest_memfd without GUEST_MEMFD_FLAG_MMAP fails with ENODEV.
        raise KvmError(errno.ENODEV, "only MMAP guest_memfd files can be read or written")
    if not file.flags & uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED:
        # kvm_gmem_fault_user_mapping: SIGBUS unless the memory is shared.
        raise KvmError(errno.EFAULT, "guest_memfd memory is not shared (no INIT_SHARED)")
    return file
