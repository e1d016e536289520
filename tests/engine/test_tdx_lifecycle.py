"""A TD's lifecycle (KVM_TDX_INIT_VM → INIT_VCPU → INIT_MEM_REGION → FINALIZE_VM), with the
errno of each rule as arch/x86/kvm/vmx/tdx.c gives it (torvalds/linux @3829d81b, 6.16):
tdx_td_init + setup_tdparams, tdx_vcpu_create, tdx_vcpu_ioctl + tdx_vcpu_init,
tdx_vcpu_init_mem_region + kvm_gmem_populate, tdx_td_finalize, tdx_vcpu_pre_run; and
kvm_arch_vcpu_pre_fault_memory (mmu.c) for pre-fault before finalize.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import KvmError, Vm, codec
from app.engine.ops import parse
from tests.engine import mmu as kit
from tests.engine.mmu import GMEM, HVA, PAGE, TDX, attrs, region, rejected

SRC = 0x5000_0000  # the VMM's copy of the initial image
SEPT_VE_DISABLE = 1 << 28
MB = 1 << 20


def lifecycle_td(size: int = 2 * MB, vcpus: int = 1) -> Vm:
    """A lifecycle TD, initialised, with its vCPUs created and initialised and a PRIVATE
    guest_memfd slot 0 of `size` bytes at GPA 0; not finalised."""
    td = Vm.create(TDX, 0, td_lifecycle=True)
    td.apply(parse("tdx_init_vm", {"attributes": SEPT_VE_DISABLE}))
    for i in range(vcpus):
        td.apply(parse("create_vcpu", {"id": i}))
        td.apply(parse("tdx_init_vcpu", {"vcpu": i}))
    fd = td.apply(parse("create_guest_memfd", {"size": size}))["fd"]
    region(td, 0, 0, size, HVA, GMEM, guest_memfd=fd, guest_memfd_offset=0)
    attrs(td, 0, size, True)
    return td


def add(td: Vm, gpa: int, n: int, flags: int = 1, src: int = SRC) -> dict:
    args = {"vcpu": 0, "source_addr": src, "gpa": gpa, "nr_pages": n, "flags": flags}
    return td.apply(parse("tdx_init_mem_region", args))


def lifecycle(td: Vm) -> dict:
    return td.tdx_state()["lifecycle"]


# -- the state machine ----------------------------------------------------------------------
def test_a_lifecycle_td_starts_uninitialized_and_runs_only_once_finalized() -> None:
    td = lifecycle_td()
    assert lifecycle(td)["td_state"] == "initialized"
    # tdx_vcpu_pre_run: KVM_RUN before finalize is EINVAL (accesses, loads, accepts).
    assert rejected(td, "access", {"vcpu": 0, "gpa": 0}).errno == errno.EINVAL
    assert rejected(td, "load", {"vcpu": 0, "gpa": 0, "len": 8}).errno == errno.EINVAL
    assert rejected(td, "accept", {"vcpu": 0, "gpa": 0}).errno == errno.EINVAL
    # kvm_arch_vcpu_pre_fault_memory: pre_fault_allowed is false until finalize.
    pf = {"vcpu": 0, "gpa": 0, "size": PAGE}
    assert rejected(td, "pre_fault", pf).errno == errno.EOPNOTSUPP
    # ... but the generic argument checks of kvm_vcpu_pre_fault_memory come first.
    assert rejected(td, "pre_fault", {**pf, "flags": 1}).errno == errno.EINVAL
    out = td.apply(parse("tdx_finalize_vm"))
    assert out["td_state"] == "runnable" and out["ops"]["TDH.MR.FINALIZE"] == 1
    assert td.apply(parse("pre_fault", pf))["size"] == 0
    kit.check(td)


def test_init_vm_rules_in_tdx_td_init_order() -> None:
    td = Vm.create(TDX, 0, td_lifecycle=True)
    assert lifecycle(td)["td_state"] == "uninitialized"
    assert td.tdx is not None and not td.tdx.hkid_assigned
    assert rejected(td, "tdx_init_vm", {"flags": 1}).errno == errno.EINVAL
    assert rejected(td, "tdx_init_vm", {"attributes": 1}).errno == errno.EINVAL
    assert rejected(td, "tdx_init_vm", {"gpaw": 40}).errno == errno.EINVAL
    assert rejected(td, "tdx_init_vm", {"gpaw": 52}).errno == errno.EINVAL  # 4-level EPT
    out = td.apply(parse("tdx_init_vm", {"gpaw": 48}))
    assert (out["td_state"], out["gpaw"]) == ("initialized", 48)
    assert out["ops"]["TDH.MNG.CREATE"] == out["ops"]["TDH.MNG.INIT"] == 1
    # state != TD_STATE_UNINITIALIZED comes before the flags check.
    assert rejected(td, "tdx_init_vm", {"flags": 1}).errno == errno.EINVAL


def test_vcpus_before_init_vm_are_eio_and_a_td_runnable_at_creation_is_past_init_vm() -> None:
    td = Vm.create(TDX, 0, td_lifecycle=True)
    with pytest.raises(KvmError) as e:
        td.apply(parse("create_vcpu", {"id": 0}))
    assert e.value.errno == errno.EIO  # tdx_vcpu_create: state != TD_STATE_INITIALIZED
    legacy = Vm.create(TDX, 1)
    assert rejected(legacy, "tdx_init_vm", {"attributes": 0}).errno == errno.EINVAL


def test_vcpus_exist_only_between_init_vm_and_finalize() -> None:
    with pytest.raises(KvmError) as e:
        Vm.create(TDX, 1, td_lifecycle=True)
    assert e.value.errno == errno.EIO
    with pytest.raises(KvmError) as e:
        Vm.create(0, 0, td_lifecycle=True)
    assert e.value.errno == errno.EINVAL
    td = lifecycle_td()
    td.apply(parse("tdx_finalize_vm"))
    assert rejected(td, "create_vcpu", {"id": 1}).errno == errno.EIO


def test_init_vcpu_rules() -> None:
    td = Vm.create(TDX, 0, td_lifecycle=True)
    td.apply(parse("tdx_init_vm", {}))
    td.apply(parse("create_vcpu", {"id": 0}))
    assert rejected(td, "tdx_init_vcpu", {"vcpu": 1}).errno == errno.ENOENT  # no such vCPU
    assert rejected(td, "tdx_init_vcpu", {"vcpu": 0, "flags": 2}).errno == errno.EINVAL
    out = td.apply(parse("tdx_init_vcpu", {"vcpu": 0, "rcx": 7}))
    assert out["vcpus_initialized"] == [0] and out["ops"]["TDH.VP.CREATE"] == 1
    # tdx_vcpu_init: tdx->state != VCPU_TD_STATE_UNINITIALIZED → EINVAL.
    assert rejected(td, "tdx_init_vcpu", {"vcpu": 0}).errno == errno.EINVAL
    td.apply(parse("tdx_finalize_vm"))
    # tdx_vcpu_ioctl: a runnable TD takes no vCPU command.
    assert rejected(td, "tdx_init_vcpu", {"vcpu": 0}).errno == errno.EINVAL


def test_vcpu_commands_before_init_vm_are_einval() -> None:
    # tdx_vcpu_ioctl: !is_hkid_assigned → EINVAL, whatever the vCPU (none can exist yet).
    td = Vm.create(TDX, 0, td_lifecycle=True)
    assert rejected(td, "tdx_init_vcpu", {"vcpu": 0}).errno == errno.EINVAL
    mem = {"vcpu": 0, "source_addr": SRC, "gpa": 0, "nr_pages": 1}
    assert rejected(td, "tdx_init_mem_region", mem).errno == errno.EINVAL


def test_non_td_vms_have_no_tdx_commands() -> None:
    vm = Vm.create(0, 1)
    assert rejected(vm, "tdx_init_vm", {}).errno == errno.ENOTTY  # vt_mem_enc_ioctl
    assert rejected(vm, "tdx_finalize_vm", {}).errno == errno.ENOTTY
    assert rejected(vm, "tdx_init_vcpu", {"vcpu": 0}).errno == errno.EINVAL  # vt_vcpu_mem_enc_ioctl


def test_finalize_rules() -> None:
    td = Vm.create(TDX, 0, td_lifecycle=True)
    assert rejected(td, "tdx_finalize_vm", {}).errno == errno.EINVAL  # no HKID yet
    td.apply(parse("tdx_init_vm", {}))
    td.apply(parse("tdx_finalize_vm"))
    assert rejected(td, "tdx_finalize_vm", {}).errno == errno.EINVAL  # already runnable


# -- KVM_TDX_INIT_MEM_REGION -----------------------------------------------------------------
def test_init_mem_region_adds_measured_pages_that_need_no_accept() -> None:
    td = lifecycle_td()
    td.apply(parse("host_write", {"userspace_addr": SRC + PAGE, "data": "c0ffee"}))
    out = add(td, 0, 4)
    assert out == {"source_addr": SRC + 4 * PAGE, "gpa": 4 * PAGE, "nr_pages": 0}
    life = lifecycle(td)["ops"]
    assert (life["TDH.MEM.PAGE.ADD"], life["TDH.MR.EXTEND"]) == (4, 64)  # 16 chunks a page
    t = td.tdx_state()
    assert t["ops"]["TDH.MEM.PAGE.AUG"] == 0 and t["accepted_pages"] == 4
    assert t["ops"]["TDH.MEM.SEPT.ADD"] == 3  # levels 3..1 under the mirror root
    add(td, 4 * PAGE, 1, flags=0)
    assert lifecycle(td)["ops"]["TDH.MR.EXTEND"] == 64  # unmeasured
    td.apply(parse("tdx_finalize_vm"))
    # The added page holds the source's bytes, readable without TDG.MEM.PAGE.ACCEPT.
    assert td.apply(parse("load", {"vcpu": 0, "gpa": PAGE, "len": 3}))["data"] == "c0ffee"
    assert td.apply(parse("accept", {"vcpu": 0, "gpa": 0, "size": 5 * PAGE}))["accepted"] == 0
    kit.check(td)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"flags": 2}, "flags beyond KVM_TDX_MEASURE_MEMORY_REGION"),
        ({"source_addr": SRC + 1}, "unaligned source"),
        ({"gpa": 1}, "unaligned gpa"),
        ({"nr_pages": 0}, "no page"),
        ({"gpa": 1 << 47}, "a shared GPA"),
        ({"gpa": (1 << 47) - PAGE, "nr_pages": 2}, "the last page is shared"),
    ],
)
def test_init_mem_region_argument_rules_are_einval(args: dict, why: str) -> None:
    td = lifecycle_td()
    base = {"vcpu": 0, "source_addr": SRC, "gpa": 0, "nr_pages": 1}
    assert rejected(td, "tdx_init_mem_region", base | args).errno == errno.EINVAL, why


def test_init_mem_region_needs_an_initialised_vcpu_and_a_td_not_finalised() -> None:
    td = lifecycle_td()
    td.apply(parse("tdx_finalize_vm"))
    mem = {"vcpu": 0, "source_addr": SRC, "gpa": 0, "nr_pages": 1}
    assert rejected(td, "tdx_init_mem_region", mem).errno == errno.EINVAL
    td = Vm.create(TDX, 0, td_lifecycle=True)
    td.apply(parse("tdx_init_vm", {}))
    td.apply(parse("create_vcpu", {"id": 0}))
    assert rejected(td, "tdx_init_mem_region", mem).errno == errno.EINVAL


def test_kvm_gmem_populate_rules() -> None:
    td = lifecycle_td()
    attrs(td, MB, MB, False)
    mem = {"vcpu": 0, "source_addr": SRC, "nr_pages": 1}
    # Not PRIVATE → EINVAL; no memslot → EINVAL.
    assert rejected(td, "tdx_init_mem_region", mem | {"gpa": MB}).errno == errno.EINVAL
    assert rejected(td, "tdx_init_mem_region", mem | {"gpa": 4 * MB}).errno == errno.EINVAL
    add(td, 0, 1)
    # The guest_memfd page is prepared already → EEXIST.
    assert rejected(td, "tdx_init_mem_region", mem | {"gpa": 0}).errno == errno.EEXIST


def test_a_failure_after_the_first_page_keeps_the_pages_added() -> None:
    td = lifecycle_td()
    add(td, 2 * PAGE, 1)
    with pytest.raises(KvmError) as e:
        add(td, 0, 4)  # pages 0, 1 go in; page 2 is EEXIST
    assert e.value.errno == errno.EEXIST and e.value.state_changed is True
    assert lifecycle(td)["ops"]["TDH.MEM.PAGE.ADD"] == 3
    kit.check(td)


# -- journals and snapshots ------------------------------------------------------------------
def test_a_td_created_without_the_lifecycle_is_runnable_as_before() -> None:
    td = Vm.create(TDX, 1)
    life = lifecycle(td)
    assert life["td_state"] == "runnable" and life["vcpus_initialized"] is None
    td.apply(parse("create_vcpu", {"id": 5}))  # as before: any time
    td.apply(parse("access", {"vcpu": 5, "gpa": 1 << 47}))


def test_lifecycle_state_survives_a_snapshot() -> None:
    td = lifecycle_td()
    add(td, 0, 2)
    back = codec.loads(codec.dumps(td))
    assert codec.digest(back) == codec.digest(td)
    assert lifecycle(back) == lifecycle(td)
    back.apply(parse("tdx_finalize_vm"))
    assert lifecycle(back)["td_state"] == "runnable"


@settings(derandomize=True, database=None, max_examples=25, deadline=None)
@given(
    pages=st.lists(st.integers(0, 63), min_size=1, max_size=12, unique=True),
    accesses=st.lists(st.integers(0, 63), max_size=8),
)
def test_lifecycle_and_runnable_at_creation_reach_the_same_page_tables(
    pages: list[int], accesses: list[int]
) -> None:
    """The same memory accepted by the guest of a runnable-at-creation TD, or added with
    INIT_MEM_REGION before finalize, gives the same mirror and direct tables."""
    size = 256 * 1024
    old = Vm.create(TDX, 1)
    fd = old.apply(parse("create_guest_memfd", {"size": size}))["fd"]
    region(old, 0, 0, size, HVA, GMEM, guest_memfd=fd, guest_memfd_offset=0)
    attrs(old, 0, size, True)
    for p in pages:
        old.apply(parse("accept", {"vcpu": 0, "gpa": p * PAGE}))
    new = lifecycle_td(size)
    for p in pages:
        add(new, p * PAGE, 1)
    new.apply(parse("tdx_finalize_vm"))
    for vm in (old, new):
        for p in accesses:
            vm.apply(parse("accept", {"vcpu": 0, "gpa": p * PAGE}))
            vm.apply(parse("access", {"vcpu": 0, "gpa": p * PAGE, "access": "write"}))
        kit.check(vm)
    assert old.mappings() == new.mappings()
    assert old.tdx_state()["accepted_pages"] == new.tdx_state()["accepted_pages"]


def test_attributes_and_gpaw_are_zero_until_init_vm_sets_them() -> None:
    """struct kvm_tdx is zero-allocated (tdx_vm_init): td->attributes and the GPAW stay 0
    until tdx_td_init (KVM_TDX_INIT_VM) stores them; a TD runnable at creation never ran
    INIT_VM and reports 0 for both."""
    td = Vm.create(TDX, 0, td_lifecycle=True)
    assert (lifecycle(td)["attributes"], lifecycle(td)["gpaw"]) == (0, 0)
    out = td.apply(parse("tdx_init_vm", {"attributes": SEPT_VE_DISABLE, "gpaw": 48}))
    assert (out["attributes"], out["gpaw"]) == (SEPT_VE_DISABLE, 48)
    runnable = Vm.create(TDX, 1)
    got = lifecycle(runnable)
    assert (got["td_state"], got["attributes"], got["gpaw"]) == ("runnable", 0, 0)
