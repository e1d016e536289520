"""guest_memfd: KVM_CREATE_GUEST_MEMFD, fallocate(2), bindings and page state, with errno."""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest

from app.engine import KvmError, codec, uapi
from app.engine.gmem import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_NO_HIDE_STALE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_ZERO_RANGE,
    FIRST_GMEM_FD,
    GMEM_PFN_BASE,
    GMEM_PFN_LIMIT,
    GmemTable,
    supported_gmem_flags,
)
from app.engine.ops import parse
from app.engine.vm import Vm
from tests.engine import expect, fingerprint
from tests.engine import mmu as kit
from tests.engine.mmu import apply_json

DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROT = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
MMAP = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP)
INIT_SHARED = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)
PAGE = 4096
MB = 1 << 20
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE


@pytest.fixture
def table() -> GmemTable:
    return GmemTable(owner="vm-a")


# -- KVM_CREATE_GUEST_MEMFD --------------------------------------------------------------------
def test_supported_flags_per_vm_type() -> None:
    assert supported_gmem_flags(None) == MMAP | INIT_SHARED
    assert supported_gmem_flags(DEFAULT) == MMAP | INIT_SHARED
    assert supported_gmem_flags(SW_PROT) == MMAP
    assert supported_gmem_flags(TDX) == MMAP


@pytest.mark.parametrize("flags", [1 << 2, 1 << 63, MMAP | 1 << 5])
def test_create_unknown_flags_is_einval(table: GmemTable, flags: int) -> None:
    expect(errno.EINVAL, table.create, MB, flags, vm_type=DEFAULT)


@pytest.mark.parametrize("vm_type", [SW_PROT, TDX])
def test_create_init_shared_refused_with_private_memory(table: GmemTable, vm_type: int) -> None:
    expect(errno.EINVAL, table.create, MB, MMAP | INIT_SHARED, vm_type=vm_type)
    assert table.create(MB, MMAP, vm_type=vm_type).flags == MMAP


@pytest.mark.parametrize("flags", [0, MMAP, INIT_SHARED, MMAP | INIT_SHARED])
def test_create_default_vm_accepts_every_supported_flag(table: GmemTable, flags: int) -> None:
    assert table.create(MB, flags, vm_type=DEFAULT).flags == flags


@pytest.mark.parametrize("size", [0, PAGE + 1, 100, 1 << 63, (1 << 64) - PAGE])
def test_create_size_not_positive_or_unaligned_is_einval(table: GmemTable, size: int) -> None:
    expect(errno.EINVAL, table.create, size, 0, vm_type=DEFAULT)


@pytest.mark.parametrize(
    "size,flags", [(-PAGE, 0), (1 << 64, 0), ("4096", 0), (PAGE, -1), (PAGE, None)]
)
def test_create_values_that_do_not_fit_are_einval(
    table: GmemTable, size: object, flags: object
) -> None:
    expect(errno.EINVAL, table.create, size, flags, vm_type=DEFAULT)


def test_create_flags_checked_before_size(table: GmemTable) -> None:
    err = expect(errno.EINVAL, table.create, 0, 1 << 7, vm_type=DEFAULT)
    assert "flags" in err.detail


def test_create_assigns_fds_and_contiguous_pfns_never_reused(table: GmemTable) -> None:
    a = table.create(2 * MB, 0, vm_type=DEFAULT)
    b = table.create(PAGE, 0, vm_type=DEFAULT)
    assert (a.fd, b.fd) == (FIRST_GMEM_FD, FIRST_GMEM_FD + 1)
    assert a.base_pfn == GMEM_PFN_BASE and a.npages == 512
    assert b.base_pfn == GMEM_PFN_BASE + 512
    assert a.pfn(3) == GMEM_PFN_BASE + 3
    table.close(a.fd)
    c = table.create(2 * MB, 0, vm_type=DEFAULT)
    assert c.fd == FIRST_GMEM_FD + 2 and c.base_pfn == GMEM_PFN_BASE + 513
    assert table.next_pfn == GMEM_PFN_BASE + 1025


def test_create_large_file_is_cheap_and_pfn_space_is_bounded(table: GmemTable) -> None:
    big = table.create(1 << 50, 0, vm_type=DEFAULT)  # 2^38 pages, nothing allocated
    assert big.allocated_pages == 0
    room = (GMEM_PFN_LIMIT - table.next_pfn) * PAGE
    expect(errno.ENOMEM, table.create, room + PAGE, 0, vm_type=DEFAULT)
    assert table.create(room, 0, vm_type=DEFAULT).npages == room // PAGE


# -- fd lookups --------------------------------------------------------------------------------
@pytest.mark.parametrize("fd", [99, -1, 0, "3", None, True])
def test_get_unknown_fd_is_ebadf(table: GmemTable, fd: object) -> None:
    table.create(MB, 0, vm_type=DEFAULT)
    expect(errno.EBADF, table.get, fd)


def test_closed_fd_is_ebadf_but_the_file_is_still_known(table: GmemTable) -> None:
    f = table.create(MB, 0, vm_type=DEFAULT)
    table.close(f.fd)
    expect(errno.EBADF, table.get, f.fd)
    expect(errno.EBADF, table.close, f.fd)
    expect(errno.EBADF, table.check_fallocate, f.fd, "allocate", 0, PAGE)
    assert table.lookup(f.fd) is f and f.closed
    assert table.open_files() == []


# -- fallocate(2) ------------------------------------------------------------------------------
@pytest.fixture
def fd(table: GmemTable) -> int:
    return table.create(4 * MB, 0, vm_type=DEFAULT).fd


def test_fallocate_bad_fd_is_ebadf(table: GmemTable) -> None:
    expect(errno.EBADF, table.check_fallocate, 42, "allocate", 0, PAGE)


@pytest.mark.parametrize("offset,length", [(-PAGE, PAGE), (0, 0), (0, -PAGE), (1 << 63, PAGE)])
def test_fallocate_negative_offset_or_nonpositive_len_is_einval(
    table: GmemTable, fd: int, offset: int, length: int
) -> None:
    expect(errno.EINVAL, table.check_fallocate, fd, KEEP, offset, length)


@pytest.mark.parametrize(
    "mode",
    [
        0,  # allocate without KEEP_SIZE: guest_memfd is not resizable
        PUNCH,  # punch hole without KEEP_SIZE (VFS rule)
        KEEP | FALLOC_FL_ZERO_RANGE,
        KEEP | FALLOC_FL_UNSHARE_RANGE,
        KEEP | FALLOC_FL_NO_HIDE_STALE,
        KEEP | FALLOC_FL_COLLAPSE_RANGE,
        FALLOC_FL_COLLAPSE_RANGE,
        FALLOC_FL_INSERT_RANGE,
        KEEP | PUNCH | FALLOC_FL_ZERO_RANGE,
        1 << 8,
        -1,
    ],
)
def test_fallocate_unsupported_modes_are_eopnotsupp(table: GmemTable, fd: int, mode: int) -> None:
    expect(errno.EOPNOTSUPP, table.check_fallocate, fd, mode, 0, PAGE)


def test_fallocate_mode_checked_before_alignment(table: GmemTable, fd: int) -> None:
    expect(errno.EOPNOTSUPP, table.check_fallocate, fd, 0, 1, 1)


def test_fallocate_offset_plus_len_overflow_is_efbig(table: GmemTable, fd: int) -> None:
    expect(errno.EFBIG, table.check_fallocate, fd, KEEP | PUNCH, 1 << 62, 1 << 62)
    # EFBIG (VFS) comes before KVM's own mode and alignment checks.
    expect(errno.EFBIG, table.check_fallocate, fd, KEEP | PUNCH, (1 << 62) + 1, 1 << 62)


@pytest.mark.parametrize("mode", ["allocate", "punch_hole"])
@pytest.mark.parametrize("offset,length", [(1, PAGE), (0, PAGE + 1), (PAGE, 10)])
def test_fallocate_unaligned_is_einval(
    table: GmemTable, fd: int, mode: str, offset: int, length: int
) -> None:
    expect(errno.EINVAL, table.check_fallocate, fd, mode, offset, length)


def test_fallocate_allocate_beyond_file_is_einval(table: GmemTable, fd: int) -> None:
    expect(errno.EINVAL, table.check_fallocate, fd, "allocate", 4 * MB - PAGE, 2 * PAGE)
    file, punch, first, count = table.check_fallocate(fd, "allocate", 4 * MB - PAGE, PAGE)
    assert (punch, first, count) == (False, 1023, 1)


def test_fallocate_punch_beyond_file_is_accepted(table: GmemTable, fd: int) -> None:
    file, punch, first, count = table.check_fallocate(fd, "punch_hole", 2 * MB, 64 * MB)
    assert (punch, first, count) == (True, 512, 16384)
    assert file.punch(first, count) == 0


def test_fallocate_numeric_modes_match_names(table: GmemTable, fd: int) -> None:
    assert table.check_fallocate(fd, KEEP, 0, PAGE)[1] is False
    assert table.check_fallocate(fd, KEEP | PUNCH, 0, PAGE)[1] is True


@pytest.mark.parametrize("mode", ["zero", "", None, 1.0])
def test_fallocate_unknown_mode_value_is_einval(table: GmemTable, fd: int, mode: object) -> None:
    expect(errno.EINVAL, table.check_fallocate, fd, mode, 0, PAGE)


@pytest.mark.parametrize("offset,length", [("0", PAGE), (0, "4096"), (0.0, PAGE), (0, None)])
def test_fallocate_non_integer_offset_or_len_is_einval(
    table: GmemTable, fd: int, offset: object, length: object
) -> None:
    expect(errno.EINVAL, table.check_fallocate, fd, "allocate", offset, length)


# -- page state --------------------------------------------------------------------------------
def test_allocate_punch_and_mask(table: GmemTable, fd: int) -> None:
    f = table.get(fd)
    assert f.allocate(10, 20) == 20
    assert f.allocate(20, 20) == 10
    assert f.allocated_pages == 30
    mask = f.is_allocated(0, 50)
    assert mask.dtype == bool and mask.shape == (50,)
    assert np.array_equal(np.nonzero(mask)[0], np.arange(10, 40))
    assert f.punch(15, 5) == 5
    assert f.allocated.to_list() == [[10, 15], [20, 40]]
    assert f.punch(0, 1 << 40) == 25
    assert f.allocated_pages == 0
    assert f.allocate(1020, 100) == 4  # clamped to the file's 1024 pages


def test_write_read_and_punch_drops_contents(table: GmemTable, fd: int) -> None:
    f = table.get(fd)
    assert f.write(PAGE - 2, b"abcd") == 2  # spans pages 0 and 1
    assert f.read(PAGE - 4, 8) == b"\0\0abcd\0\0"
    assert set(f.contents) == {0, 1}
    f.punch(1, 1)
    assert set(f.contents) == {0}
    assert f.read(PAGE - 2, 4) == b"ab\0\0"
    assert f.is_allocated(0, 2).tolist() == [True, False]


def test_sixteen_million_pages_stay_cheap(table: GmemTable) -> None:
    f = table.create(64 << 30, 0, vm_type=DEFAULT)  # 16M pages
    t0 = time.perf_counter()
    assert f.allocate(0, 1 << 24) == 1 << 24
    for i in range(0, 1 << 24, 1 << 20):
        f.punch(i, 7)
    assert f.allocated_pages == (1 << 24) - 16 * 7
    assert int(f.is_allocated(0, 1 << 22).sum()) == (1 << 22) - 4 * 7
    assert time.perf_counter() - t0 < 2.0


# -- bindings ----------------------------------------------------------------------------------
def test_bind_unbind_and_bindings_in(table: GmemTable, fd: int) -> None:
    table.bind(fd, 0, 256, (0, 1))
    table.bind(fd, 2 * MB, 128, (0, 2))
    f = table.get(fd)
    assert f.bindings == [(0, 256, (0, 1)), (512, 128, (0, 2))]
    assert f.bindings_in(200, 600) == [(200, 56, (0, 1)), (512, 88, (0, 2))]
    expect(errno.EEXIST, table.check_bind, fd, PAGE * 255, 2 * PAGE)
    table.check_bind(fd, PAGE * 256, 256 * PAGE)  # the gap between them is free
    table.unbind(fd, (0, 1))
    assert f.bindings == [(512, 128, (0, 2))]
    table.unbind(None, (0, 2))  # a slot without a file: nothing to do
    table.unbind(1234, (0, 2))


def test_check_bind_rules_in_order(table: GmemTable, fd: int) -> None:
    expect(errno.EBADF, table.check_bind, 77, 1, PAGE)  # EBADF before offset checks
    expect(errno.EINVAL, table.check_bind, fd, PAGE, PAGE, owner="vm-b")
    expect(errno.EINVAL, table.check_bind, fd, 100, PAGE)
    expect(errno.EINVAL, table.check_bind, fd, 1 << 63, PAGE)
    expect(errno.EINVAL, table.check_bind, fd, 4 * MB, PAGE)
    assert table.check_bind(fd, 4 * MB - PAGE, PAGE) is table.get(fd)
    before = list(table.get(fd).bindings)
    assert before == []  # checking binds nothing


def test_close_frees_pages_and_keeps_bindings_for_the_caller(table: GmemTable, fd: int) -> None:
    f = table.get(fd)
    table.bind(fd, 0, 16, (0, 3))
    f.write(0, b"x")
    f.allocate(0, 100)
    closed = table.close(fd)
    assert closed is f and f.closed
    assert f.allocated_pages == 0 and f.contents == {}
    assert f.bindings == [(0, 16, (0, 3))]
    table.unbind(fd, (0, 3))  # deleting the slot later still works on a closed file
    assert f.bindings == []
    assert f.to_dict()["closed"] is True


def test_to_dict_bounds_the_listed_runs(table: GmemTable) -> None:
    f = table.create(64 * MB, 0, vm_type=DEFAULT)
    for i in range(0, 2000, 2):
        f.allocate(i, 1)
    d = f.to_dict()
    assert d["allocated_runs"] == 1000 and len(d["allocated"]) == 256  # type: ignore[arg-type]
    assert d["allocated"][:2] == [[0, 1], [2, 3]]  # type: ignore[index]


def test_pfn_owner(table: GmemTable) -> None:
    a = table.create(MB, 0, vm_type=DEFAULT)
    b = table.create(MB, 0, vm_type=DEFAULT)
    assert table.pfn_owner(b.pfn(5)) == (b, 5)
    assert table.pfn_owner(a.pfn(255)) == (a, 255)
    assert table.pfn_owner(GMEM_PFN_BASE - 1) is None


# -- through Vm.apply ----------------------------------------------------------------------------
@pytest.fixture
def vm() -> Vm:
    return Vm.create(DEFAULT)


def test_apply_create_guest_memfd(vm: Vm) -> None:
    r = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": MMAP}))
    assert (r["fd"], r["size"], r["flags"]) == (FIRST_GMEM_FD, 2 * MB, MMAP)
    assert [f["fd"] for f in vm.guest_memfds()] == [FIRST_GMEM_FD]


@pytest.mark.parametrize(
    "vm_type,args",
    [
        (TDX, {"size": MB, "flags": MMAP | INIT_SHARED}),
        (DEFAULT, {"size": MB, "flags": 1 << 2}),
        (DEFAULT, {"size": 0}),
        (DEFAULT, {"size": MB + 1}),
        (DEFAULT, {"size": -MB}),
        (DEFAULT, {"size": "0x1000"}),
    ],
)
def test_apply_create_guest_memfd_rejected_changes_nothing(vm_type: int, args: dict) -> None:
    vm = Vm.create(vm_type)
    before = fingerprint(vm)
    expect(errno.EINVAL, apply_json, vm, "create_guest_memfd", args)
    assert fingerprint(vm) == before


def test_apply_fallocate_allocate_and_punch(vm: Vm) -> None:
    fd = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": 0}))["fd"]
    args = {"fd": fd, "mode": "allocate", "offset": 0, "len": MB}
    assert vm.apply(parse("gmem_fallocate", args))["allocated"] == 256
    assert vm.apply(parse("gmem_fallocate", {**args, "len": 2 * MB}))["allocated"] == 256
    punch = {"fd": fd, "mode": "punch_hole", "offset": MB, "len": 64 * MB}
    assert vm.apply(parse("gmem_fallocate", punch))["freed"] == 256
    assert vm.guest_memfds()[0]["allocated_pages"] == 256


@pytest.mark.parametrize(
    "args,err",
    [
        ({"fd": 99, "mode": "allocate", "offset": 0, "len": PAGE}, errno.EBADF),
        ({"mode": "allocate", "offset": -PAGE, "len": PAGE}, errno.EINVAL),
        ({"mode": "allocate", "offset": 0, "len": 0}, errno.EINVAL),
        ({"mode": "allocate", "offset": 1, "len": PAGE}, errno.EINVAL),
        ({"mode": "allocate", "offset": 0, "len": 4 * MB}, errno.EINVAL),
        ({"mode": "punch_hole", "offset": 0, "len": 100}, errno.EINVAL),
        ({"mode": PUNCH, "offset": 0, "len": PAGE}, errno.EOPNOTSUPP),
        ({"mode": 0, "offset": 0, "len": PAGE}, errno.EOPNOTSUPP),
        ({"mode": KEEP | FALLOC_FL_ZERO_RANGE, "offset": 0, "len": PAGE}, errno.EOPNOTSUPP),
        ({"mode": KEEP | PUNCH, "offset": 1 << 62, "len": 1 << 62}, errno.EFBIG),
        ({"mode": "zero_range", "offset": 0, "len": PAGE}, errno.EINVAL),
        ({"mode": [1], "offset": 0, "len": PAGE}, errno.EINVAL),
        ({"mode": "allocate", "offset": "0", "len": PAGE}, errno.EINVAL),
    ],
)
def test_apply_fallocate_rejected_changes_nothing(vm: Vm, args: dict, err: int) -> None:
    fd = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": 0}))["fd"]
    vm.apply(parse("gmem_fallocate", {"fd": fd, "mode": KEEP, "offset": 0, "len": MB}))
    before = fingerprint(vm)
    expect(err, apply_json, vm, "gmem_fallocate", {"fd": fd, **args})
    assert fingerprint(vm) == before


def test_apply_close_then_fd_is_ebadf_and_the_slot_stays(vm: Vm) -> None:
    fd = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": 0}))["fd"]
    vm.apply(
        parse(
            "set_user_memory_region",
            {
                "slot": 0,
                "flags": 4,
                "guest_phys_addr": 0,
                "memory_size": MB,
                "userspace_addr": 0x7000_0000,
                "guest_memfd": fd,
                "guest_memfd_offset": 0,
            },
        ),
    )
    vm.apply(parse("gmem_close", {"fd": fd}))
    expect(errno.EBADF, apply_json, vm, "gmem_close", {"fd": fd})
    expect(
        errno.EBADF,
        apply_json,
        vm,
        "gmem_fallocate",
        {"fd": fd, "mode": "allocate", "offset": 0, "len": PAGE},
    )
    assert [s["guest_memfd"] for s in vm.memslots()] == [fd]
    r = vm.apply(
        parse(
            "set_user_memory_region",
            {"slot": 0, "memory_size": 0, "flags": 0, "guest_phys_addr": 0, "userspace_addr": 0},
        ),
    )
    assert r["change"] == "delete"


# -- regression cases from the engine review --------------------------------------------------
@pytest.mark.parametrize(
    ("vm_type", "flags"),
    [(kit.TDX, kit.MMAP), (kit.DEFAULT, kit.MMAP), (kit.SW_PROTECTED, kit.MMAP)],
)
def test_gmem_host_io_of_mmap_file_without_init_shared_is_efault(vm_type: int, flags: int) -> None:
    vm = Vm.create(vm_type)
    fd = vm.apply(parse("create_guest_memfd", dict(size=kit.MB, flags=flags)))["fd"]
    before = codec.digest(vm)
    with pytest.raises(KvmError) as info:
        vm.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.EFAULT
    err = kit.rejected(vm, "gmem_write", dict(fd=fd, offset=0, data="ff"))
    assert err.errno == errno.EFAULT
    assert codec.digest(vm) == before


def test_gmem_host_io_after_td_store_is_efault() -> None:
    td = Vm.create(kit.TDX)
    fd = td.apply(parse("create_guest_memfd", dict(size=kit.MB, flags=kit.MMAP)))["fd"]
    kit.region(td, 0, 0, kit.MB, kit.HVA, kit.GMEM, guest_memfd=fd)
    kit.attrs(td, 0, kit.MB, True)
    td.apply(parse("accept", dict(vcpu=0, gpa=0, size=kit.PAGE)))
    td.apply(parse("store", dict(vcpu=0, gpa=0, data="5ec2e7")))
    with pytest.raises(KvmError) as info:
        td.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.EFAULT
    assert kit.rejected(td, "gmem_write", dict(fd=fd, offset=0, data="ff")).errno == errno.EFAULT
    assert td.apply(parse("load", dict(vcpu=0, gpa=0, len=3)))["data"] == "5ec2e7"


@pytest.mark.parametrize("vm_type", [kit.TDX, kit.DEFAULT])
def test_gmem_host_io_without_mmap_is_enodev(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    fd = vm.apply(parse("create_guest_memfd", dict(size=kit.MB, flags=0)))["fd"]
    with pytest.raises(KvmError) as info:
        vm.gmem_read(fd, 0, 3)
    assert info.value.errno == errno.ENODEV
    assert kit.rejected(vm, "gmem_write", dict(fd=fd, offset=0, data="ff")).errno == errno.ENODEV


def test_gmem_host_io_with_mmap_and_init_shared_works() -> None:
    vm = Vm.create(kit.DEFAULT)
    fd = vm.apply(parse("create_guest_memfd", dict(size=kit.MB, flags=kit.MMAP | kit.INIT_SHARED)))[
        "fd"
    ]
    assert vm.apply(parse("gmem_write", dict(fd=fd, offset=0, data="ab")))["written"] == 1
    assert vm.gmem_read(fd, 0, 2) == {"data": "ab00"}
