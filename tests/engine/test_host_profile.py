"""Host profiles: the KVM module parameters a VM runs under (host_profile.py).

- kvm_intel.pml (vmx.c, kvm_mmu_slot_apply_flags, kvm_arch_mmu_enable_log_dirty_pt_masked):
  dirty logging clears D bits instead of write-protecting, writes are logged without a fault,
  a PML-full exit per 512 entries; the dirty bitmaps are the same as without PML.
- kvm.eager_page_split (kvm_mmu_slot_apply_flags, kvm_mmu_slot_try_split_huge_pages): off,
  enabling dirty logging write-protects huge leaves and a write fault takes them apart.
- kvm.nx_huge_pages (disallowed_hugepage_adjust, make_spte, track_possible_nx_huge_page,
  kvm_recover_nx_huge_pages): exec faults map 4K, huge leaves are mapped NX, recovery zaps.
- kvm.tdp_mmu=0: the shadow MMU, not modelled: EOPNOTSUPP.
"""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm, codec
from app.engine.ops import parse
from tests.engine import mmu as kit
from tests.engine.mmu import HVA, LOG_DIRTY

MB = 1 << 20


def thp_vm(host: dict | None = None, size: int = 4 * MB, engine_rev: int = 2) -> Vm:
    vm = Vm.create(kit.DEFAULT, 1, host=host, engine_rev=engine_rev)
    kit.hugepage(vm, HVA, size)
    kit.region(vm, 0, 0, size, HVA)
    return vm


def log_dirty(vm: Vm, size: int = 4 * MB) -> dict:
    return kit.region(vm, 0, 0, size, HVA, LOG_DIRTY)["zap"]


def dirty_bits(vm: Vm) -> tuple[str, int]:
    d = vm.apply(parse("get_dirty_log", {"slot": 0}))
    return d["bitmap"], d["dirty_count"]


def test_defaults_are_the_profile_vkmmu_always_modelled() -> None:
    vm = Vm.create(0, 1)
    assert vm.info()["host"] == {
        "enable_pml": False,
        "eager_page_split": True,
        "nx_huge_pages": False,
        "tdp_mmu": True,
    }


def test_tdp_mmu_off_is_eopnotsupp_and_unknown_parameters_einval() -> None:
    with pytest.raises(KvmError) as e:
        Vm.create(0, 1, host={"tdp_mmu": False})
    assert e.value.errno == errno.EOPNOTSUPP and "shadow MMU" in e.value.detail
    with pytest.raises(KvmError) as e:
        Vm.create(0, 1, host={"ept": True})
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as e:
        Vm.create(0, 1, host={"enable_pml": 1})
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("eager", [True, False])
def test_pml_gives_the_same_dirty_bitmaps_with_fewer_faults(eager: bool) -> None:
    runs = {}
    for pml in (False, True):
        vm = thp_vm({"enable_pml": pml, "eager_page_split": eager})
        kit.access(vm, 0, 4 * MB, "write")
        zap = log_dirty(vm)
        before = vm.stats()["pf_taken"]
        rounds = []
        for size in (3 * MB, MB // 2):
            kit.access(vm, 0, size, "write")
            rounds.append(dirty_bits(vm))
        s = vm.stats()
        runs[pml] = (rounds, s["pf_taken"] - before, s["pml_entries"], s["pml_full_exits"], zap)
        kit.check(vm)
    (plain, faults, entries, _, zap), (with_pml, pml_faults, pml_entries, exits, pml_zap) = (
        runs[False],
        runs[True],
    )
    assert plain == with_pml and [c for _, c in plain] == [768, 128]
    assert entries == 0 and pml_entries > 0
    assert pml_faults < faults
    if eager:
        # Every 4K leaf was writable with D clear: no fault at all, one PML-full exit per
        # 512 logged GPAs (768 + 128 = 896 → 1).
        assert pml_faults == 0 and pml_entries == 896 and exits == 1
        assert zap["huge_pages_split"] == pml_zap["huge_pages_split"] == 2
        assert zap["sptes_write_protected"] == 1024 and pml_zap["sptes_write_protected"] == 0


def test_without_eager_split_logging_write_protects_huge_leaves_and_writes_split_them() -> None:
    vm = thp_vm({"eager_page_split": False})
    kit.access(vm, 0, 4 * MB, "write")
    zap = log_dirty(vm)
    assert zap["huge_pages_split"] == 0 and zap["sptes_write_protected"] == 2
    assert kit.pages(vm) == (0, 2, 0)  # still huge, read-only
    kit.access(vm, 0, 4096, "write")
    assert kit.pages(vm)[1] == 1 and kit.pages(vm)[0] >= 1  # the written 2M went to 4K
    assert dirty_bits(vm)[1] == 1
    kit.check(vm)


def test_nx_huge_pages_exec_faults_map_4k_and_recovery_zaps_them() -> None:
    """Engine revision 1: the exec fault zapped the huge leaf and mapped one 4K leaf
    (test_fault_split.py has revision 2, which splits it as kvm_tdp_mmu_map does)."""
    vm = thp_vm({"nx_huge_pages": True}, engine_rev=1)
    assert kit.access(vm, 0, 2 * MB, "read")["levels"]["2m"] == 1
    # make_spte: a huge leaf is mapped without X under the mitigation.
    leaf = kit.leaf(vm, 0)
    assert leaf is not None and leaf["level"] == 2 and not leaf["x"]
    out = kit.access(vm, 0, 4096, "exec")
    assert out["levels"] == {"4k": 1, "2m": 0, "1g": 0}
    out = kit.access(vm, 2 * MB, 4096, "exec")
    assert out["levels"]["4k"] == 1
    assert vm.stats()["nx_lpage_splits"] == 2
    rec = vm.apply(parse("recover_nx_huge_pages", {"ratio": 2}))  # ceil(2 / 2) = 1
    assert (rec["recovered"], rec["remaining"]) == (1, 1)
    assert (rec["zap"]["cause"], rec["zap"]["path"]) == ("nx_recovery", "recover_nx_huge_pages")
    assert vm.stats()["nx_lpage_splits"] == 1
    # The next non-exec fault maps the recovered region huge again.
    assert kit.access(vm, 0, 4096, "read")["levels"]["2m"] == 1
    assert vm.apply(parse("recover_nx_huge_pages", {"ratio": 0}))["recovered"] == 0
    kit.check(vm)


def test_without_the_mitigation_exec_faults_map_huge() -> None:
    vm = thp_vm()
    assert kit.access(vm, 0, 4096, "exec")["levels"]["2m"] == 1
    assert vm.stats()["nx_lpage_splits"] == 0


def test_a_profile_survives_a_snapshot_and_default_digests_do_not_change() -> None:
    vm = thp_vm({"nx_huge_pages": True, "enable_pml": True})
    kit.access(vm, 0, 4096, "exec")
    back = codec.loads(codec.dumps(vm))
    assert back.host_profile == vm.host_profile and back.nx_huge_pages == vm.nx_huge_pages
    assert codec.digest(back) == codec.digest(vm)
    assert codec.digest(thp_vm()) == codec.digest(thp_vm(None))
    assert codec.digest(thp_vm({"enable_pml": True})) != codec.digest(thp_vm())
