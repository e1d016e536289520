"""KVM_SET_USER_MEMORY_REGION(2) validation, rule by rule (kvm-memslots.md §2.1), with errno."""

from __future__ import annotations

import copy
import errno

import pytest

from app.engine import codec, uapi
from app.engine.errors import KvmError
from app.engine.gmem import GmemTable
from app.engine.memslots import (
    ChangeKind,
    Memslot,
    MemslotChange,
    MemslotSet,
    SetUserMemoryRegion,
    check_arch_prepare,
    check_region,
)
from app.engine.ops import parse
from app.engine.vm import Vm
from app.engine.zap import ZapEvent
from tests.engine import expect, fingerprint

DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROT = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
LOG = int(uapi.KVM_MEM_LOG_DIRTY_PAGES)
RO = int(uapi.KVM_MEM_READONLY)
GMEM = int(uapi.KVM_MEM_GUEST_MEMFD)
MMAP = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP)
PAGE = 4096
MB = 1 << 20
END4 = uapi.USER_ADDR_END_4LEVEL
MAX_GFN = (1 << 40) - 1


class Env:
    """What vm.py holds for memslots: the slot sets per address space and the gmem table."""

    def __init__(self, vm_type: int = DEFAULT) -> None:
        self.vm_type = vm_type
        self.spaces = [MemslotSet(a) for a in range(uapi.nr_address_spaces(vm_type))]
        self.gmem = GmemTable(owner="vm-a")

    def check(self, v2: bool = True, user_addr_end: int = END4, **fields: object) -> MemslotChange:
        req = SetUserMemoryRegion.from_json(
            {"flags": 0, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0, **fields}
        )
        return check_region(
            req,
            vm_type=self.vm_type,
            spaces=self.spaces,
            gmem=self.gmem,
            user_addr_end=user_addr_end,
            v2=v2,
        )

    def apply(self, change: MemslotChange) -> None:
        """The minimal perform step (vm.py does this plus zaps and generations)."""
        if change.kind in (ChangeKind.CREATE, ChangeKind.MOVE):
            check_arch_prepare(change, max_gfn=MAX_GFN, gfn_direct_bits=0)
        if change.kind in (ChangeKind.DELETE, ChangeKind.MOVE, ChangeKind.FLAGS_ONLY):
            assert change.old is not None
            old = self.spaces[change.old.as_id].remove(change.old.id)
            if change.kind is ChangeKind.DELETE:
                self.gmem.unbind(old.guest_memfd, (old.as_id, old.id))
        if change.kind in (ChangeKind.CREATE, ChangeKind.MOVE, ChangeKind.FLAGS_ONLY):
            new = change.new
            assert new is not None
            self.spaces[new.as_id].install(new)
            if change.kind is ChangeKind.CREATE and new.guest_memfd is not None:
                self.gmem.bind(
                    new.guest_memfd, new.guest_memfd_offset, new.npages, (new.as_id, new.id)
                )

    def set(self, **fields: object) -> MemslotChange:
        change = self.check(**fields)
        self.apply(change)
        return change

    def snapshot(self) -> object:
        return (
            [[s.to_dict() for s in space] for space in self.spaces],
            [copy.deepcopy(f.bindings) for f in self.gmem],
        )


def region(slot: int = 0, gpa: int = 0, size: int = MB, uaddr: int = 0x7000_0000, flags: int = 0):
    return {
        "slot": slot,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": uaddr,
        "flags": flags,
    }


@pytest.fixture
def env() -> Env:
    return Env()


# -- V1: values no struct field can hold -------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("slot", -1),
        ("slot", 1 << 32),
        ("flags", -1),
        ("flags", 1 << 32),
        ("guest_phys_addr", -PAGE),
        ("guest_phys_addr", 1 << 64),
        ("memory_size", 1 << 64),
        ("memory_size", -PAGE),
        ("userspace_addr", 1 << 70),
        ("userspace_addr", "0x1000"),
        ("memory_size", 4096.0),
        ("memory_size", True),
        ("slot", None),
        ("guest_memfd", -1),
        ("guest_memfd", 1 << 32),
        ("guest_memfd_offset", -PAGE),
        ("guest_memfd_offset", 1 << 64),
    ],
)
def test_v1_values_that_do_not_fit_are_einval(env: Env, field: str, value: object) -> None:
    expect(errno.EINVAL, env.check, **{**region(), field: value})


def test_v1_missing_slot_is_einval() -> None:
    expect(errno.EINVAL, SetUserMemoryRegion.from_json, {"memory_size": PAGE})


# -- V2: the v1 ioctl --------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [GMEM, 1 << 3, GMEM | LOG])
def test_v2_v1_ioctl_refuses_flags_beyond_log_dirty_and_readonly(env: Env, flags: int) -> None:
    expect(errno.EINVAL, env.check, v2=False, **region(flags=flags))


def test_v2_v1_ioctl_ignores_the_region2_fields(env: Env) -> None:
    change = env.check(v2=False, guest_memfd=-5, guest_memfd_offset=123, **region(flags=RO | LOG))
    assert change.kind is ChangeKind.CREATE
    assert change.new is not None and change.new.guest_memfd is None


# -- V3: user slot ids -------------------------------------------------------------------------
@pytest.mark.parametrize("id", [32764, 32765, 32766, 32767, 0xFFFF])
def test_v3_internal_and_larger_slot_ids_are_einval(env: Env, id: int) -> None:
    expect(errno.EINVAL, env.check, **region(slot=id))
    expect(errno.EINVAL, env.check, **region(slot=(1 << 16) | id))


def test_v3_last_user_slot_id_is_accepted(env: Env) -> None:
    assert env.check(**region(slot=32763)).kind is ChangeKind.CREATE


def test_v3_comes_before_flag_checks(env: Env) -> None:
    # Both are EINVAL; the detail names the first rule that failed.
    err = expect(errno.EINVAL, env.check, **region(slot=32764, flags=1 << 9))
    assert "KVM_USER_MEM_SLOTS" in err.detail


# -- V5: flags per VM type ---------------------------------------------------------------------
@pytest.mark.parametrize("flags", [1 << 3, 1 << 4, 1 << 15, 1 << 16, 1 << 31])
def test_v5_unknown_flag_bits_are_einval(env: Env, flags: int) -> None:
    expect(errno.EINVAL, env.check, **region(flags=flags))


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROT, TDX])
def test_v5_guest_memfd_excludes_log_dirty_and_readonly(vm_type: int) -> None:
    env = Env(vm_type)
    expect(errno.EINVAL, env.check, **region(flags=GMEM | LOG))
    expect(errno.EINVAL, env.check, **region(flags=GMEM | RO))


def test_v5_readonly_refused_for_protected_state_vms() -> None:
    expect(errno.EINVAL, Env(TDX).check, **region(flags=RO))


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROT])
def test_v5_readonly_allowed_without_protected_state(vm_type: int) -> None:
    assert Env(vm_type).check(**region(flags=RO | LOG)).kind is ChangeKind.CREATE


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROT, TDX])
def test_v5_guest_memfd_flag_allowed_for_every_vm_type(vm_type: int) -> None:
    env = Env(vm_type)
    fd = env.gmem.create(MB, 0, vm_type=vm_type).fd
    change = env.check(guest_memfd=fd, **region(flags=GMEM))
    assert change.kind is ChangeKind.CREATE


def test_v5_applies_to_deletes(env: Env) -> None:
    env.set(**region())
    before = env.snapshot()
    expect(errno.EINVAL, env.check, **region(size=0, flags=1 << 5))
    assert env.snapshot() == before


# -- V6-V8: alignment and user address range ---------------------------------------------------
def test_v6_size_unaligned(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(size=MB + 1))


def test_v7_gpa_unaligned(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(gpa=0x800))


def test_v8_uaddr_unaligned(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(uaddr=0x7000_0010))


def test_v8_user_range_must_end_inside_user_space(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(uaddr=END4 - PAGE, size=2 * PAGE))
    expect(errno.EINVAL, env.check, **region(uaddr=0xFFFF_8000_0000_0000))  # kernel address
    assert env.check(**region(uaddr=END4 - PAGE, size=PAGE)).kind is ChangeKind.CREATE


def test_v8_five_level_host_allows_higher_addresses(env: Env) -> None:
    fields = region(uaddr=1 << 50)
    expect(errno.EINVAL, env.check, **fields)
    assert env.check(user_addr_end=uapi.USER_ADDR_END_5LEVEL, **fields).kind is ChangeKind.CREATE


def test_v8_checked_for_deletes_too(env: Env) -> None:
    env.set(**region())
    expect(errno.EINVAL, env.check, **region(size=0, uaddr=0x123))
    expect(errno.EINVAL, env.check, **region(size=0, uaddr=1 << 60))
    assert env.check(**region(size=0, uaddr=0)).kind is ChangeKind.DELETE


# -- V9: guest_memfd offset --------------------------------------------------------------------
def test_v9_gmem_offset_unaligned(env: Env) -> None:
    fd = env.gmem.create(4 * MB, 0, vm_type=DEFAULT).fd
    expect(errno.EINVAL, env.check, guest_memfd=fd, guest_memfd_offset=100, **region(flags=GMEM))


def test_v9_gmem_offset_plus_size_wraps(env: Env) -> None:
    expect(
        errno.EINVAL,
        env.check,
        guest_memfd=999,  # would be EBADF at V20: V9 comes first
        guest_memfd_offset=(1 << 64) - PAGE,
        **region(flags=GMEM),
    )


def test_v9_offset_ignored_without_the_gmem_flag(env: Env) -> None:
    assert env.check(guest_memfd_offset=77, **region()).kind is ChangeKind.CREATE


# -- V10: address spaces -----------------------------------------------------------------------
def test_v10_smm_address_space_on_a_default_vm(env: Env) -> None:
    change = env.check(**region(slot=(1 << 16) | 3))
    assert change.kind is ChangeKind.CREATE
    assert change.new is not None and (change.new.as_id, change.new.id) == (1, 3)
    assert change.new.slot == 0x10003


@pytest.mark.parametrize("vm_type", [SW_PROT, TDX])
def test_v10_no_smm_address_space_with_private_memory(vm_type: int) -> None:
    expect(errno.EINVAL, Env(vm_type).check, **region(slot=1 << 16))


def test_v10_as_id_2_is_einval(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(slot=2 << 16))


# -- V11, V12 ----------------------------------------------------------------------------------
def test_v11_gpa_plus_size_wraps(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(gpa=(1 << 64) - PAGE, size=2 * PAGE))


def test_v12_more_than_max_pages(env: Env) -> None:
    size = (uapi.KVM_MEM_MAX_NR_PAGES + 1) * PAGE
    expect(errno.EINVAL, env.check, **region(size=size, uaddr=0x1000_0000))


def test_v12_exactly_max_pages_is_accepted(env: Env) -> None:
    size = uapi.KVM_MEM_MAX_NR_PAGES * PAGE
    change = env.check(**region(size=size, uaddr=0x1000_0000))
    assert change.kind is ChangeKind.CREATE
    assert change.new is not None and change.new.npages == uapi.KVM_MEM_MAX_NR_PAGES


# -- V14: delete -------------------------------------------------------------------------------
def test_v14_delete_of_absent_slot_is_einval(env: Env) -> None:
    expect(errno.EINVAL, env.check, **region(size=0))


def test_v14_delete_of_slot_in_other_address_space_is_einval(env: Env) -> None:
    env.set(**region(slot=4))
    expect(errno.EINVAL, env.check, **region(slot=(1 << 16) | 4, size=0))


def test_v14_delete_ignores_gpa_and_flags_of_the_request(env: Env) -> None:
    env.set(**region(slot=4, flags=LOG))
    change = env.check(**region(slot=4, size=0, gpa=0x5555_0000, flags=RO))
    assert change.kind is ChangeKind.DELETE
    assert change.new is None and change.old is env.spaces[0].get(4)


def test_v14_deleted_id_can_be_reused_with_any_parameters(env: Env) -> None:
    env.set(**region(slot=4, flags=RO))
    env.set(**region(slot=4, size=0))
    change = env.set(**region(slot=4, gpa=64 * MB, size=2 * MB, uaddr=0x9000_0000, flags=LOG))
    assert change.kind is ChangeKind.CREATE


# -- V17: modifying an existing slot -----------------------------------------------------------
def test_v17_identical_request_is_a_no_op(env: Env) -> None:
    first = env.set(**region(flags=LOG))
    change = env.check(**region(flags=LOG))
    assert change.kind is ChangeKind.NONE
    assert change.old is first.new and change.new is first.new


def test_v17_move(env: Env) -> None:
    env.set(**region())
    change = env.check(**region(gpa=16 * MB))
    assert change.kind is ChangeKind.MOVE
    assert change.old is not None and change.old.base_gfn == 0
    assert change.new is not None and change.new.base_gfn == 16 * MB // PAGE
    assert change.new is not change.old


def test_v17_move_may_toggle_log_dirty_in_the_same_call(env: Env) -> None:
    env.set(**region())
    change = env.check(**region(gpa=16 * MB, flags=LOG))
    assert change.kind is ChangeKind.MOVE
    assert change.new is not None and change.new.flags == LOG


def test_v17_flags_only(env: Env) -> None:
    env.set(**region())
    change = env.check(**region(flags=LOG))
    assert change.kind is ChangeKind.FLAGS_ONLY
    assert change.new is not None and change.new.flags == LOG and change.new.base_gfn == 0


def test_v17_resize_is_einval(env: Env) -> None:
    env.set(**region())
    expect(errno.EINVAL, env.check, **region(size=2 * MB))


def test_v17_new_userspace_addr_is_einval(env: Env) -> None:
    env.set(**region())
    expect(errno.EINVAL, env.check, **region(uaddr=0x8000_0000))


@pytest.mark.parametrize("old,new", [(0, RO), (RO, 0), (RO | LOG, LOG)])
def test_v17_readonly_toggle_is_einval(env: Env, old: int, new: int) -> None:
    env.set(**region(flags=old))
    expect(errno.EINVAL, env.check, **region(flags=new))


def _gmem_slot(env: Env) -> int:
    fd = env.gmem.create(4 * MB, 0, vm_type=env.vm_type).fd
    env.set(guest_memfd=fd, **region(flags=GMEM))
    return fd


def test_v17_gmem_slot_identical_request_is_einval(env: Env) -> None:
    fd = _gmem_slot(env)
    # A request carrying GUEST_MEMFD for an existing slot is refused before the no-op test.
    expect(errno.EINVAL, env.check, guest_memfd=fd, **region(flags=GMEM))


def test_v17_gmem_slot_cannot_move(env: Env) -> None:
    fd = _gmem_slot(env)
    expect(errno.EINVAL, env.check, guest_memfd=fd, **region(gpa=8 * MB, flags=GMEM))


@pytest.mark.parametrize("flags", [0, LOG])
def test_v17_dropping_guest_memfd_is_einval(env: Env, flags: int) -> None:
    _gmem_slot(env)
    expect(errno.EINVAL, env.check, **region(flags=flags))
    expect(errno.EINVAL, env.check, **region(flags=flags, gpa=8 * MB))


def test_v17_adding_guest_memfd_is_einval(env: Env) -> None:
    env.set(**region())
    fd = env.gmem.create(4 * MB, 0, vm_type=DEFAULT).fd
    expect(errno.EINVAL, env.check, guest_memfd=fd, **region(flags=GMEM))


def test_v17_gmem_slot_can_be_deleted_and_unbinds(env: Env) -> None:
    fd = _gmem_slot(env)
    assert env.gmem.get(fd).bindings
    env.set(**region(size=0))
    assert env.gmem.get(fd).bindings == []


# -- V18: overlap ------------------------------------------------------------------------------
def test_v18_overlap_on_create_is_eexist(env: Env) -> None:
    env.set(**region(slot=0, gpa=0, size=2 * MB))
    expect(errno.EEXIST, env.check, **region(slot=1, gpa=MB, size=2 * MB, uaddr=0x9000_0000))
    expect(errno.EEXIST, env.check, **region(slot=1, gpa=2 * MB - PAGE, size=PAGE))


def test_v18_overlap_covering_a_smaller_slot(env: Env) -> None:
    env.set(**region(slot=0, gpa=4 * MB, size=PAGE))
    expect(errno.EEXIST, env.check, **region(slot=1, gpa=0, size=16 * MB))


def test_v18_adjacent_slots_do_not_overlap(env: Env) -> None:
    env.set(**region(slot=0, gpa=0, size=2 * MB))
    assert env.check(**region(slot=1, gpa=2 * MB, size=MB)).kind is ChangeKind.CREATE


def test_v18_overlap_on_move_is_eexist(env: Env) -> None:
    env.set(**region(slot=0, gpa=0, size=2 * MB))
    env.set(**region(slot=1, gpa=8 * MB, size=MB, uaddr=0x9000_0000))
    expect(errno.EEXIST, env.check, **region(slot=1, gpa=MB, size=MB, uaddr=0x9000_0000))


def test_v18_a_move_does_not_conflict_with_itself(env: Env) -> None:
    env.set(**region(slot=0, gpa=0, size=2 * MB))
    assert env.check(**region(slot=0, gpa=PAGE, size=2 * MB)).kind is ChangeKind.MOVE


def test_v18_other_address_spaces_never_conflict(env: Env) -> None:
    env.set(**region(slot=0))
    assert env.check(**region(slot=(1 << 16) | 1)).kind is ChangeKind.CREATE


def test_v18_eexist_comes_before_gmem_binding_errors(env: Env) -> None:
    env.set(**region(slot=0))
    expect(errno.EEXIST, env.check, guest_memfd=999, **region(slot=1, flags=GMEM))


# -- V20: guest_memfd binding ------------------------------------------------------------------
def test_v20_fd_not_open_is_ebadf(env: Env) -> None:
    expect(errno.EBADF, env.check, guest_memfd=999, **region(flags=GMEM))


def test_v20_closed_fd_is_ebadf(env: Env) -> None:
    fd = env.gmem.create(4 * MB, 0, vm_type=DEFAULT).fd
    env.gmem.close(fd)
    expect(errno.EBADF, env.check, guest_memfd=fd, **region(flags=GMEM))


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_v20_open_fd_that_is_not_a_guest_memfd_is_einval(env: Env, fd: int) -> None:
    expect(errno.EINVAL, env.check, guest_memfd=fd, **region(flags=GMEM))


def test_v20_another_vms_file_is_einval(env: Env) -> None:
    file = env.gmem.create(4 * MB, 0, vm_type=DEFAULT)
    file.owner_vm = "vm-b"  # as if another VM's file were reachable through this fd
    expect(errno.EINVAL, env.check, guest_memfd=file.fd, **region(flags=GMEM))


def test_v20_range_beyond_the_file_is_einval(env: Env) -> None:
    fd = env.gmem.create(2 * MB, 0, vm_type=DEFAULT).fd
    expect(errno.EINVAL, env.check, guest_memfd=fd, **region(size=4 * MB, flags=GMEM))
    expect(
        errno.EINVAL,
        env.check,
        guest_memfd=fd,
        guest_memfd_offset=MB + PAGE,
        **region(size=MB, flags=GMEM),
    )
    change = env.check(guest_memfd=fd, guest_memfd_offset=MB, **region(size=MB, flags=GMEM))
    assert change.kind is ChangeKind.CREATE


def test_v20_offset_negative_as_loff_t_is_einval(env: Env) -> None:
    fd = env.gmem.create(2 * MB, 0, vm_type=DEFAULT).fd
    expect(
        errno.EINVAL, env.check, guest_memfd=fd, guest_memfd_offset=1 << 63, **region(flags=GMEM)
    )


def test_v20_file_range_already_bound_is_eexist(env: Env) -> None:
    fd = env.gmem.create(4 * MB, 0, vm_type=DEFAULT).fd
    env.set(guest_memfd=fd, **region(slot=0, gpa=0, size=2 * MB, flags=GMEM))
    expect(
        errno.EEXIST,
        env.check,
        guest_memfd=fd,
        guest_memfd_offset=MB,
        **region(slot=1, gpa=16 * MB, size=MB, flags=GMEM),
    )
    change = env.set(
        guest_memfd=fd, guest_memfd_offset=2 * MB, **region(slot=1, gpa=16 * MB, flags=GMEM)
    )
    assert change.new is not None and change.new.guest_memfd == fd
    assert change.new.guest_memfd_offset == 2 * MB
    assert [b[2] for b in env.gmem.get(fd).bindings] == [(0, 0), (0, 1)]


def test_v20_mmap_file_makes_a_gmem_only_slot(env: Env) -> None:
    fd = env.gmem.create(4 * MB, MMAP, vm_type=DEFAULT).fd
    change = env.check(guest_memfd=fd, **region(flags=GMEM))
    assert change.new is not None and change.new.gmem_only
    fd2 = env.gmem.create(4 * MB, 0, vm_type=DEFAULT).fd
    change = env.check(guest_memfd=fd2, **region(flags=GMEM))
    assert change.new is not None and not change.new.gmem_only


# -- V21: arch prepare -------------------------------------------------------------------------
def _create(base_gfn: int, npages: int) -> MemslotChange:
    new = Memslot(0, 0, base_gfn, npages, 0, 0x7000_0000, None, 0)
    return MemslotChange(ChangeKind.CREATE, None, new)


def test_v21_last_gfn_beyond_max_gfn_is_einval() -> None:
    check_arch_prepare(_create(MAX_GFN, 1), max_gfn=MAX_GFN, gfn_direct_bits=0)
    expect(
        errno.EINVAL, check_arch_prepare, _create(MAX_GFN, 2), max_gfn=MAX_GFN, gfn_direct_bits=0
    )


def test_v21_tdx_shared_bit_alias_on_the_last_gfn_is_einval() -> None:
    shared = 1 << 35  # GPAW 48
    expect(
        errno.EINVAL,
        check_arch_prepare,
        _create(shared, 1),
        max_gfn=MAX_GFN,
        gfn_direct_bits=shared,
    )
    expect(
        errno.EINVAL,
        check_arch_prepare,
        _create(shared - 1, 2),
        max_gfn=MAX_GFN,
        gfn_direct_bits=shared,
    )
    check_arch_prepare(_create(shared - 1, 1), max_gfn=MAX_GFN, gfn_direct_bits=shared)
    # Only the last gfn is tested (kvm-private-tdx.md §8.11).
    check_arch_prepare(_create(shared, shared + 1), max_gfn=MAX_GFN, gfn_direct_bits=shared)


def test_v21_applies_to_move_only_among_modifications() -> None:
    old = Memslot(0, 0, 0, 2, 0, 0x7000_0000, None, 0)
    beyond = Memslot(0, 0, MAX_GFN, 2, 0, 0x7000_0000, None, 0)
    move = MemslotChange(ChangeKind.MOVE, old, beyond)
    expect(errno.EINVAL, check_arch_prepare, move, max_gfn=MAX_GFN, gfn_direct_bits=0)
    for kind in (ChangeKind.DELETE, ChangeKind.FLAGS_ONLY, ChangeKind.NONE):
        check_arch_prepare(MemslotChange(kind, beyond, beyond), max_gfn=MAX_GFN, gfn_direct_bits=0)


def test_v21_runs_after_check_region_so_a_huge_gpa_passes_it(env: Env) -> None:
    change = env.check(**region(gpa=(MAX_GFN + 1) * PAGE))
    assert change.kind is ChangeKind.CREATE
    expect(errno.EINVAL, check_arch_prepare, change, max_gfn=MAX_GFN, gfn_direct_bits=0)


# -- check_region changes nothing --------------------------------------------------------------
def test_check_region_never_changes_state(env: Env) -> None:
    fd = env.gmem.create(8 * MB, 0, vm_type=DEFAULT).fd
    env.set(**region(slot=0))
    env.set(guest_memfd=fd, **region(slot=1, gpa=64 * MB, flags=GMEM))
    before = env.snapshot()
    for fields in (
        region(slot=0, gpa=16 * MB),  # move
        region(slot=0, flags=LOG),  # flags only
        region(slot=0, size=0),  # delete
        region(slot=2, gpa=32 * MB),  # create
        {**region(slot=3, gpa=128 * MB, flags=GMEM), "guest_memfd": fd, "guest_memfd_offset": MB},
    ):
        env.check(**fields)
    for fields in (region(slot=0, size=2 * MB), region(slot=5, gpa=0), region(slot=9, size=0)):
        with pytest.raises(KvmError):
            env.check(**fields)
    assert env.snapshot() == before


# -- Memslot and MemslotSet --------------------------------------------------------------------
def test_memslot_properties_and_dict() -> None:
    slot = Memslot(1, 7, 0x100, 0x20, LOG, 0x7F00_0000_0000, 5, 2 * MB)
    assert slot.slot == 0x10007
    assert slot.end_gfn == 0x120
    assert slot.hva(0x102) == 0x7F00_0000_2000
    assert slot.gmem_index(0x102) == 512 + 2
    assert slot.to_dict() == {
        "slot": 0x10007,
        "as_id": 1,
        "id": 7,
        "flags": LOG,
        "guest_phys_addr": 0x100000,
        "memory_size": 0x20000,
        "userspace_addr": 0x7F00_0000_0000,
        "guest_memfd": 5,
        "guest_memfd_offset": 2 * MB,
        "base_gfn": 0x100,
        "npages": 0x20,
    }
    assert Memslot(0, 1, 0, 1, 0, 0, None, 0).to_dict()["guest_memfd"] == 0


def _slot(id: int, base: int, n: int, as_id: int = 0) -> Memslot:
    return Memslot(as_id, id, base, n, 0, 0x1000_0000 + (base << 12), None, 0)


def test_memslot_set_lookup() -> None:
    space = MemslotSet(1)
    assert space.generation == 1
    for s in (_slot(5, 100, 10, 1), _slot(2, 0, 50, 1), _slot(9, 200, 1, 1)):
        space.install(s)
    assert len(space) == 3 and 5 in space
    assert [s.id for s in space] == [2, 5, 9]
    assert [s.id for s in space.by_gfn()] == [2, 5, 9]
    assert space.find(0).id == 2 and space.find(49).id == 2  # type: ignore[union-attr]
    assert space.find(50) is None and space.find(99) is None
    assert space.find(109).id == 5 and space.find(110) is None  # type: ignore[union-attr]
    assert space.find(200).id == 9 and space.find(201) is None  # type: ignore[union-attr]
    assert [s.id for s in space.overlapping(40, 70)] == [2, 5]
    assert [s.id for s in space.overlapping(50, 50)] == []
    assert [s.id for s in space.overlapping(0, 1000)] == [2, 5, 9]
    assert space.overlapping(0, 0) == []
    assert space.total_pages() == 61
    assert space.remove(5).id == 5
    assert space.find(105) is None and [s.id for s in space] == [2, 9]


def test_memslot_set_refuses_overlap_duplicates_and_foreign_slots() -> None:
    space = MemslotSet(0)
    space.install(_slot(1, 10, 10))
    expect(errno.EEXIST, space.install, _slot(2, 19, 5))
    # Reaching in from below, the same start, covering it whole.
    for base, n in ((5, 6), (10, 1), (0, 100)):
        expect(errno.EEXIST, space.install, _slot(2, base, n))
    expect(errno.EEXIST, space.install, _slot(1, 100, 5))
    expect(errno.EINVAL, space.install, _slot(3, 100, 5, as_id=1))
    expect(errno.EINVAL, space.install, _slot(3, 100, 0))
    expect(errno.EINVAL, space.remove, 42)
    assert [s.id for s in space] == [1]
    for id, base in ((2, 20), (3, 5), (4, 21)):  # touching it, on either side, and each other
        space.install(_slot(id, base, 5 if id == 3 else 1))
    assert [s.base_gfn for s in space.by_gfn()] == [5, 10, 20, 21]
    expect(errno.EEXIST, space.install, _slot(5, 19, 2))  # between two, over both


def test_memslot_set_scales_without_per_page_work() -> None:
    space = MemslotSet(0)
    for i in range(2000):
        space.install(_slot(i, i * (1 << 31), (1 << 31) - 1))
    assert space.find(1999 * (1 << 31) + 5).id == 1999  # type: ignore[union-attr]
    assert [s.id for s in space.overlapping(3 << 31, 1 << 32)] == [3, 4]


def test_region_request_defaults() -> None:
    req = SetUserMemoryRegion.from_json({"slot": 3})
    assert (req.flags, req.memory_size, req.guest_memfd, req.guest_memfd_offset) == (0, 0, 0, 0)


# -- through Vm.apply ----------------------------------------------------------------------------
def put(vm: Vm, **fields: object) -> dict:
    return vm.apply(parse("set_user_memory_region", {**region(), **fields}))


@pytest.fixture
def vm() -> Vm:
    return Vm.create(DEFAULT)


def test_apply_reports_every_change_kind(vm: Vm) -> None:
    r = put(vm)
    assert r["change"] == "create" and r["zap"] is None
    assert r["memslot"]["npages"] == 256 and r["memslot"]["slot"] == 0
    generations = [s.generation for s in vm.spaces]
    r = put(vm)
    assert r["change"] == "none" and r["zap"] is None
    assert [s.generation for s in vm.spaces] == generations  # a no-op publishes nothing
    r = put(vm, flags=LOG)
    assert r["change"] == "flags_only" and r["memslot"]["flags"] == LOG
    r = put(vm, flags=LOG, guest_phys_addr=16 * MB)
    assert r["change"] == "move" and r["memslot"]["guest_phys_addr"] == 16 * MB
    assert r["zap"]["path"] == "zap_all_fast"  # DEFAULT VM, SLOT_ZAP_ALL enabled
    r = put(vm, memory_size=0)
    assert r["change"] == "delete" and r["memslot"] is None and r["zap"]["path"]
    assert vm.memslots() == []


def test_an_unanswered_call_leaves_the_same_state_and_a_lean_answer() -> None:
    """`answer=False` (replay): no memslot views, the zap event the VM's own; same state."""
    full, lean = Vm.create(DEFAULT), Vm.create(DEFAULT)
    steps = [{}, {"flags": LOG}, {"flags": LOG, "guest_phys_addr": 16 * MB}, {"memory_size": 0}]
    for args in steps:
        op = parse("set_user_memory_region", {**region(), **args})
        a = full.apply(op, at=1.0, durations=[5])
        b = lean.apply(op, at=1.0, durations=[5], answer=False)
        assert b["change"] == a["change"] and b["memslot"] is None
        assert (b["zap"] is None) == (a["zap"] is None)
        if b["zap"] is not None:
            assert b["zap"] is lean.events[-1] and b["zap"] == a["zap"]
    assert codec.digest(lean) == codec.digest(full)
    put(lean)  # after an unanswered call, calls and queries answer in full again
    assert lean.memslots()[0]["npages"] == 256 and put(lean, flags=LOG)["memslot"]["flags"] == LOG


def test_delete_events_are_whole_and_independent_with_or_without_roots(vm: Vm) -> None:
    """Each delete's zap event is its own dict in ZapEvent's shape, whether the fast zap
    found roots to free or none at all."""
    events = []
    for fault in (False, True, False):
        put(vm)
        if fault:
            vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": MB, "access": "write"}))
        events.append(put(vm, memory_size=0)["zap"])
    empty, freed, again = events
    for ev in events:
        assert list(ev) == list(ZapEvent.__annotations__)
    assert freed["sptes_zapped_total"] == 256 and freed["roots_invalidated"] == 1
    assert again["sptes_zapped"] == empty["sptes_zapped"] and again["sptes_zapped_total"] == 0
    assert (again["tables_freed"], again["roots_invalidated"]) == (0, 0)
    assert again is not empty and again["sptes_zapped"] is not empty["sptes_zapped"]
    assert vm.events[-1] == again and vm.events[-1] is not again


def test_apply_delete_takes_the_slot_path_once_the_quirk_is_disabled(vm: Vm) -> None:
    put(vm)
    vm.apply(parse("enable_cap", {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [0x80, 0, 0, 0]}))
    assert put(vm, memory_size=0)["zap"]["path"] == "zap_slot_leafs"


@pytest.mark.parametrize("vm_type", [SW_PROT, TDX])
def test_apply_non_default_vms_never_zap_all(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    put(vm)
    assert put(vm, memory_size=0)["zap"]["path"] == "zap_slot_leafs"


BAD_REQUESTS = [
    ({"slot": 32764}, errno.EINVAL),  # V3
    ({"slot": -1}, errno.EINVAL),  # V1
    ({"memory_size": "0x1000"}, errno.EINVAL),  # V1: the engine takes numbers only
    ({"guest_phys_addr": 1 << 64}, errno.EINVAL),  # V1
    ({"slot": 1, "flags": 8}, errno.EINVAL),  # V5
    ({"slot": 1, "flags": GMEM | LOG, "guest_memfd": 3}, errno.EINVAL),  # V5
    ({"slot": 1, "memory_size": PAGE + 1}, errno.EINVAL),  # V6
    ({"slot": 1, "guest_phys_addr": 0x10}, errno.EINVAL),  # V7
    ({"slot": 1, "userspace_addr": 0x7000_0001}, errno.EINVAL),  # V8
    ({"slot": 1, "userspace_addr": END4}, errno.EINVAL),  # V8
    ({"slot": 1, "flags": GMEM, "guest_memfd": 3, "guest_memfd_offset": 8}, errno.EINVAL),  # V9
    ({"slot": 2 << 16}, errno.EINVAL),  # V10
    ({"slot": 1, "guest_phys_addr": (1 << 64) - PAGE}, errno.EINVAL),  # V11
    ({"slot": 1, "memory_size": 1 << 43, "userspace_addr": PAGE}, errno.EINVAL),  # V12
    ({"slot": 1, "memory_size": 0}, errno.EINVAL),  # V14
    ({"memory_size": 2 * MB}, errno.EINVAL),  # V17 resize
    ({"userspace_addr": 0x9000_0000}, errno.EINVAL),  # V17 new uaddr
    ({"flags": RO}, errno.EINVAL),  # V17 READONLY toggle
    ({"flags": GMEM, "guest_memfd": 3}, errno.EINVAL),  # V17 modify with GUEST_MEMFD
    ({"slot": 1, "guest_phys_addr": MB - PAGE}, errno.EEXIST),  # V18
    ({"slot": 1, "guest_phys_addr": 2 * MB, "flags": GMEM, "guest_memfd": 99}, errno.EBADF),
    ({"slot": 1, "guest_phys_addr": 2 * MB, "flags": GMEM, "guest_memfd": 0}, errno.EINVAL),
    (
        {
            "slot": 1,
            "guest_phys_addr": 2 * MB,
            "flags": GMEM,
            "guest_memfd": 3,
            "guest_memfd_offset": 2 * MB,
        },
        errno.EINVAL,
    ),  # V20: beyond the 2 MiB file
    ({"slot": 1, "guest_phys_addr": (MAX_GFN + 1) * PAGE}, errno.EINVAL),  # V21 on CREATE
]


@pytest.mark.parametrize("fields,err", BAD_REQUESTS)
def test_apply_rejected_request_changes_nothing(vm: Vm, fields: dict, err: int) -> None:
    put(vm)
    fd = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": 0}))["fd"]
    assert fd == 3
    before = fingerprint(vm)
    error = expect(err, put, vm, **fields)
    assert not getattr(error, "state_changed", False)
    assert fingerprint(vm) == before


def test_apply_gmem_binding_overlap_is_eexist_and_changes_nothing(vm: Vm) -> None:
    fd = vm.apply(parse("create_guest_memfd", {"size": 2 * MB, "flags": 0}))["fd"]
    put(vm, flags=GMEM, guest_memfd=fd)
    before = fingerprint(vm)
    expect(
        errno.EEXIST,
        put,
        vm,
        slot=1,
        guest_phys_addr=8 * MB,
        flags=GMEM,
        guest_memfd=fd,
        guest_memfd_offset=MB - PAGE,
    )
    assert fingerprint(vm) == before


def test_apply_failed_move_beyond_max_gfn_keeps_the_zap_and_restores_the_slot(vm: Vm) -> None:
    put(vm)
    generation = vm.spaces[0].generation
    error = expect(errno.EINVAL, put, vm, guest_phys_addr=(MAX_GFN + 1) * PAGE)
    # The kernel zaps before the arch check (kvm-memslots.md §2.1 "ordering subtlety").
    assert getattr(error, "state_changed", False) is True
    slot = vm.spaces[0].get(0)
    assert slot is not None and slot.base_gfn == 0 and not slot.invalid
    assert vm.spaces[0].generation == generation + 2 * vm.nr_as
    assert vm.zap_events()[0]["cause"] == "memslot_move"
