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

import base64
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


def _bitmap(nbits: int, set_bits: list[int]) -> str:
    words = [0] * (-(-nbits // 64))
    for b in set_bits:
        words[b // 64] |= 1 << (b % 64)
    return base64.b64encode(b"".join(w.to_bytes(8, "little") for w in words)).decode()


def _manual_pml_vm(manual: int, eager: bool = True) -> Vm:
    vm = Vm.create(kit.DEFAULT, 1, host={"enable_pml": True, "eager_page_split": eager})
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[manual])))
    return vm


def test_pml_clear_dirty_log_clears_d_on_exactly_the_pages_of_its_set_bits() -> None:
    """kvm_arch_mmu_enable_log_dirty_pt_masked with PML → kvm_mmu_clear_dirty_pt_masked
    (kvm_tdp_mmu_clear_dirty_pt_masked): D goes on the 4K leaves whose bit is set, the bit
    indexed from the slot's first GFN; W stays, so nothing is write-protected. The slot
    starts 16 pages into a page table, so the bits are not the table's indexes."""
    vm = _manual_pml_vm(manual=1)
    base, npages = 16 * kit.PAGE, 256
    kit.region(vm, 0, base, npages * kit.PAGE, HVA, LOG_DIRTY)
    kit.access(vm, base, npages * kit.PAGE, "write")  # 4K faults: D set, logged directly
    assert vm.stats()["pml_entries"] == 0
    cleared = [*range(64), 70]
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=128, bitmap=_bitmap(128, cleared)),
        )
    )
    assert out == {"cleared": 65, "sptes_write_protected": 0}
    leaves = [kit.last_entry(vm, base + p * kit.PAGE) for p in range(npages)]
    assert [p for p, e in enumerate(leaves) if not e["dirty"]] == cleared
    assert all(e["w"] and e["level"] == 1 for e in leaves)
    # The next writes are logged by the CPU only where D was cleared: no fault at all.
    before = vm.stats()
    kit.access(vm, base, npages * kit.PAGE, "write")
    after = vm.stats()
    assert after["pml_entries"] - before["pml_entries"] == len(cleared)
    assert after["pf_taken"] == before["pf_taken"]
    assert dirty_bits(vm)[1] == npages
    kit.check(vm)


@pytest.mark.parametrize("rev", [2, 3])
def test_pml_clear_dirty_log_write_protects_a_huge_leaf_and_clears_the_4k_leaves_after_it(
    rev: int,
) -> None:
    """kvm_arch_mmu_enable_log_dirty_pt_masked with INITIALLY_SET: the huge leaves over each
    word's first and last page are write-protected, W and MMU-writable, PML or not
    (kvm_mmu_slot_gfn_write_protect at PG_LEVEL_2M); then kvm_tdp_mmu_clear_dirty_pt_masked
    passes over every leaf above 4K and clears D on the 4K leaves. A write under the huge
    leaf then faults, splits it and is logged. Engine revision 2 left the 2M leaf writable:
    its writes were never logged (kept for journals written under it)."""
    vm = _manual_pml_vm(manual=3, eager=False)  # MANUAL_PROTECT | INITIALLY_SET
    vm.set_engine_rev(rev)
    kit.hugepage(vm, HVA, 4 * MB)
    kit.region(vm, 0, 0, 4 * MB, HVA)
    kit.access(vm, 0, 2 * MB, "write")
    assert kit.pages(vm) == (0, 1, 0)
    kit.region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)  # INITIALLY_SET: nothing protected yet
    kit.access(vm, 2 * MB, 64 * kit.PAGE, "write")  # a logging slot maps 4K
    assert kit.pages(vm) == (64, 1, 0)
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=1024, bitmap=_bitmap(1024, list(range(1024)))),
        )
    )
    huge = kit.last_entry(vm, 0)
    assert (huge["level"], huge["dirty"]) == (2, True)
    assert not any(kit.last_entry(vm, 2 * MB + p * kit.PAGE)["dirty"] for p in range(64))
    before = vm.stats()["pml_entries"]
    kit.access(vm, 2 * MB, 64 * kit.PAGE, "write")
    assert vm.stats()["pml_entries"] - before == 64
    if rev == 2:
        assert out == {"cleared": 1024, "sptes_write_protected": 0} and huge["w"]
    else:
        assert out == {"cleared": 1024, "sptes_write_protected": 1}
        assert not huge["w"] and not huge["mmu_writable"]
        kit.access(vm, 5 * kit.PAGE, 8, "write")  # under the 2M leaf: faults, splits, logged
        log = vm.apply(parse("get_dirty_log", {"slot": 0}))
        assert 5 in kit.dirty_bits_set(log) and kit.pages(vm)[1] == 0
    kit.check(vm)


def test_pml_enabling_logging_clears_d_only_inside_the_slot() -> None:
    """kvm_mmu_slot_apply_flags with PML → kvm_mmu_slot_leaf_clear_dirty →
    kvm_tdp_mmu_clear_dirty_slot: the walk is bounded by the slot; another slot's leaves
    keep their D bits."""
    vm = Vm.create(kit.DEFAULT, 1, host={"enable_pml": True})
    kit.region(vm, 0, 0, 64 * kit.PAGE, HVA)
    kit.region(vm, 1, 64 * kit.PAGE, 64 * kit.PAGE, HVA + MB)
    kit.access(vm, 0, 128 * kit.PAGE, "write")
    kit.region(vm, 0, 0, 64 * kit.PAGE, HVA, LOG_DIRTY)
    assert not any(kit.last_entry(vm, p * kit.PAGE)["dirty"] for p in range(64))
    assert all(kit.last_entry(vm, p * kit.PAGE)["dirty"] for p in range(64, 128))
    kit.check(vm)


def test_pml_get_dirty_log_clears_d_only_on_4k_leaves_under_harvested_bits() -> None:
    """KVM_GET_DIRTY_LOG without manual protect re-arms with the harvested bits:
    kvm_arch_mmu_enable_log_dirty_pt_masked → kvm_tdp_mmu_clear_dirty_pt_masked, 4K leaves
    only. A 2M leaf left whole and dirty (INITIALLY_SET at enable, then manual protect turned
    off, legal at any time) keeps its D bit."""
    vm = _manual_pml_vm(manual=3, eager=False)
    kit.hugepage(vm, HVA, 4 * MB)
    kit.region(vm, 0, 0, 4 * MB, HVA)
    kit.access(vm, 0, 2 * MB, "write")
    kit.region(vm, 0, 0, 4 * MB, HVA, LOG_DIRTY)  # INITIALLY_SET: nothing cleared
    kit.access(vm, 2 * MB, 8 * kit.PAGE, "write")  # 4K leaves, D set
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[0])))
    log = vm.apply(parse("get_dirty_log", {"slot": 0}))
    assert (log["dirty_count"], log["sptes_write_protected"]) == (1024, 0)
    huge = kit.last_entry(vm, 0)
    assert (huge["level"], huge["dirty"], huge["w"]) == (2, True, True)
    assert not any(kit.last_entry(vm, 2 * MB + p * kit.PAGE)["dirty"] for p in range(8))
    kit.check(vm)
