"""Guest faults on the TDP MMU: leaves, levels, exits, A/D bits and data (kvm-memslots.md §8,
kvm-private-tdx.md §2.3-§2.5, §7)."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm, codec
from app.engine.ops import parse
from tests.engine import mmu as kit

from .mmu import region

U = 0x7F00_0000_0000  # 1 GiB aligned, so GPA and HVA are congruent when offsets match
KB4, MB, GB = 1 << 12, 1 << 20, 1 << 30
LOG, RO = 1, 2


def access(vm: Vm, gpa: int, size: int = KB4, kind: str = "write", vcpu: int = 0) -> dict:
    return vm.apply(parse("access", dict(vcpu=vcpu, gpa=gpa, size=size, access=kind)))


def leaf(vm: Vm, gpa: int) -> dict | None:
    """The leaf entry (decoded) of the single root's walk, or None if not mapped."""
    (root,) = vm.translate(gpa)["roots"]
    last = root["walk"][-1]
    return last if last.get("present") and last.get("leaf") else None


def check(vm: Vm) -> None:
    """Audit clean, and pages_4k/2m/1g equal the leaves that exist (audit + mappings)."""
    a = vm.audit()
    assert a["ok"], a["violations"]
    s = vm.stats()
    got = {"4k": s["pages_4k"], "2m": s["pages_2m"], "1g": s["pages_1g"]}
    assert got == a["checked"]["leaves"]
    by_level = {1: 0, 2: 0, 3: 0}
    for run in vm.mappings():
        by_level[run["level"]] += run["npages"] // (1 << (9 * (run["level"] - 1)))
    assert got == {"4k": by_level[1], "2m": by_level[2], "1g": by_level[3]}


@pytest.fixture
def vm() -> Vm:
    v = Vm.create(0, 2)
    region(v, 0, 0, 4 * MB, U)
    return v


# --------------------------------------------------------------------------- 4 KiB leaves
def test_write_fault_maps_4k_leaves_on_the_hva_pfns(vm: Vm) -> None:
    r = access(vm, 0, 4 * MB)
    assert r["exit"] is None
    assert (r["pages"], r["mapped"], r["spurious"], r["refaults"]) == (1024, 1024, 0, 0)
    assert r["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    s = vm.stats()
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"]) == (1024, 0, 0)
    # root (L4) + L3 + L2 + two L1 tables for 4 MiB
    assert s["page_tables"] == 5
    e = leaf(vm, 0x5123)
    assert e is not None and e["level"] == 1
    assert e["pfn"] == (U >> 12) + 5
    assert e["w"] and e["r"] and e["accessed"] and e["dirty"]
    assert e["host_writable"] and e["mmu_writable"]
    assert vm.translate(0x5123)["roots"][0]["leaf"]["hpa"] == U + 0x5123
    check(vm)


def test_second_touch_is_spurious_and_maps_nothing(vm: Vm) -> None:
    access(vm, 0, 4 * MB)
    r = access(vm, 0, 4 * MB, "read", vcpu=1)
    assert (r["pages"], r["mapped"], r["spurious"]) == (1024, 0, 1024)
    assert vm.stats()["pages_4k"] == 1024
    check(vm)


def test_vcpus_share_one_direct_root(vm: Vm) -> None:
    access(vm, 0, KB4, vcpu=0)
    access(vm, MB, KB4, vcpu=1)
    roots = vm.roots()
    assert len(roots) == 1 and roots[0]["valid"] and roots[0]["role"] == "direct"
    views = {v["id"]: v["roots"] for v in vm.vcpus_view()}
    assert views[0] == views[1] == {"direct": roots[0]["id"]}
    assert roots[0]["sptes"] == {"4k": 2, "2m": 0, "1g": 0}


def test_partial_range_maps_exactly_the_touched_pages(vm: Vm) -> None:
    r = access(vm, 0x1800, 0x2000, "read")  # bytes 0x1800..0x37ff: pages 1, 2, 3
    assert (r["pages"], r["mapped"]) == (3, 3)
    assert leaf(vm, 0x0000) is None
    assert leaf(vm, 0x1000) is not None and leaf(vm, 0x3000) is not None
    assert leaf(vm, 0x4000) is None
    check(vm)


def test_five_level_paging_builds_five_tables_for_one_page() -> None:
    v = Vm.create(0, 1, paging_levels=5)
    region(v, 0, 1 << 50, 2 * MB, U)
    r = access(v, 1 << 50)
    assert r["mapped"] == 1 and r["exit"] is None
    assert v.stats()["page_tables"] == 5
    assert v.roots()[0]["level"] == 5
    assert [w["level"] for w in v.translate(1 << 50)["roots"][0]["walk"]] == [5, 4, 3, 2, 1]
    check(v)


# --------------------------------------------------------------------------- exits
def test_no_slot_is_an_mmio_exit_with_gpa_len_is_write(vm: Vm) -> None:
    gpa = 64 * MB + 0x10
    assert vm.apply(parse("load", dict(vcpu=0, gpa=gpa, len=4))) == {
        "exit": {"reason": "KVM_EXIT_MMIO", "gpa": gpa, "len": 4, "is_write": False}
    }
    assert vm.apply(parse("store", dict(vcpu=0, gpa=gpa, data="abcd"))) == {
        "exit": {"reason": "KVM_EXIT_MMIO", "gpa": gpa, "len": 2, "is_write": True}
    }
    r = access(vm, 64 * MB, KB4, "read")
    assert r["exit"]["reason"] == "KVM_EXIT_MMIO"
    assert (r["exit"]["gpa"], r["exit"]["is_write"]) == (64 * MB, False)
    assert r["mapped"] == 0
    assert vm.stats()["pages_4k"] == 0
    check(vm)


def test_no_slot_installs_a_4k_mmio_spte_not_a_leaf(vm: Vm) -> None:
    """kvm-private-tdx.md §2.3.1 step 4: KVM_PFN_NOSLOT → an MMIO SPTE at 4K (no huge adjust)."""
    access(vm, 64 * MB, KB4, "read")
    walk = vm.translate(64 * MB)["roots"][0]["walk"]
    assert walk[-1]["level"] == 1
    assert walk[-1]["present"] is False and walk[-1]["mmio"] is True
    assert vm.stats()["pf_mmio_spte_created"] == 1
    check(vm)


def test_a_slot_created_over_a_cached_mmio_spte_maps_memory(vm: Vm) -> None:
    """§3.1 step 7: CREATE zaps nothing; the stale MMIO SPTE is dead by its generation."""
    assert access(vm, 64 * MB, KB4, "read")["exit"] is not None
    r = region(vm, 1, 64 * MB, MB, U + 64 * MB)
    assert r["zap"] is None
    r = access(vm, 64 * MB, KB4, "read")
    assert (r["exit"], r["mapped"]) == (None, 1)
    assert leaf(vm, 64 * MB)["pfn"] == (U + 64 * MB) >> 12
    check(vm)


def test_access_stops_at_the_first_exit(vm: Vm) -> None:
    r = access(vm, 4 * MB - 2 * KB4, 4 * KB4, "write")  # two pages in the slot, then none
    assert r["mapped"] == 2
    assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": 4 * MB, "len": 8, "is_write": True}
    assert vm.stats()["pages_4k"] == 2
    assert leaf(vm, 4 * MB - KB4) is not None
    check(vm)


def test_write_to_readonly_slot_is_an_mmio_write_exit() -> None:
    v = Vm.create(0, 1)
    region(v, 3, 16 * MB, MB, U + 16 * MB, flags=RO)
    r = access(v, 16 * MB, 2 * KB4, "write")
    assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": 16 * MB, "len": 8, "is_write": True}
    assert r["mapped"] == 0 and v.stats()["pages_4k"] == 0
    assert v.apply(parse("store", dict(vcpu=0, gpa=16 * MB + 8, data="0102"))) == {
        "exit": {"reason": "KVM_EXIT_MMIO", "gpa": 16 * MB + 8, "len": 2, "is_write": True}
    }
    assert v.host_read(U + 16 * MB + 8, 2) == {"data": "0000"}
    check(v)


def test_read_of_readonly_slot_maps_read_only_and_a_later_write_still_exits() -> None:
    v = Vm.create(0, 1)
    region(v, 3, 16 * MB, MB, U + 16 * MB, flags=RO)
    v.apply(parse("host_write", dict(userspace_addr=U + 16 * MB + 0x1000, data="c0ffee")))
    r = access(v, 16 * MB, 2 * KB4, "read")
    assert (r["mapped"], r["exit"]) == (2, None)
    e = leaf(v, 16 * MB)
    assert e is not None
    assert (e["r"], e["w"], e["host_writable"], e["mmu_writable"]) == (True, False, False, False)
    assert v.apply(parse("load", dict(vcpu=0, gpa=16 * MB + 0x1000, len=3))) == {"data": "c0ffee"}
    r = access(v, 16 * MB, KB4, "write")
    assert r["exit"]["reason"] == "KVM_EXIT_MMIO" and r["exit"]["is_write"] is True
    assert leaf(v, 16 * MB)["w"] is False
    check(v)


# --------------------------------------------------------------------------- huge pages
def test_thp_on_congruent_aligned_slot_maps_2m_leaves() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=8 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    r = access(v, 0, 4 * MB)
    assert r["levels"] == {"4k": 0, "2m": 2, "1g": 0}
    assert (r["pages"], r["mapped"]) == (1024, 1024)
    s = v.stats()
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"]) == (0, 2, 0)
    assert s["page_tables"] == 3  # root, L3, L2: no L1 table at all
    e = leaf(v, 2 * MB + 0x3000)
    assert e is not None and e["level"] == 2 and e["pfn"] == (U + 2 * MB) >> 12
    assert v.translate(2 * MB + 0x3000)["roots"][0]["leaf"]["pfn"] == (U + 2 * MB + 0x3000) >> 12
    check(v)


def test_one_touch_maps_the_whole_2m_page() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    r = access(v, 0x3000, KB4, "read")
    assert r["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    assert (r["pages"], r["mapped"]) == (1, 512)
    r = access(v, 0x5000, KB4, "read")
    assert (r["mapped"], r["spurious"]) == (0, 1)
    check(v)


def test_thp_with_hva_not_congruent_to_gpa_maps_4k() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=8 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U + KB4)  # gfn ^ hva_pfn has low bits set: every region disallowed
    r = access(v, 0, 4 * MB)
    assert r["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    check(v)


def test_huge_leaves_only_where_the_slot_covers_the_whole_region() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=8 * MB, advice="hugepage")))
    region(v, 0, 1 * MB, 4 * MB, U + 1 * MB)  # [1M, 5M): head and tail regions partial
    r = access(v, 1 * MB, 4 * MB)
    assert r["levels"] == {"4k": 512, "2m": 1, "1g": 0}
    assert leaf(v, 1 * MB)["level"] == 1
    assert leaf(v, 2 * MB)["level"] == 2
    assert leaf(v, 4 * MB)["level"] == 1
    check(v)


def test_without_host_huge_pages_everything_is_4k() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    assert access(v, 0, 4 * MB)["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    v2 = Vm.create(0, 1)
    v2.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="nohugepage")))
    region(v2, 0, 0, 4 * MB, U)
    assert access(v2, 0, 4 * MB)["levels"] == {"4k": 1024, "2m": 0, "1g": 0}


def test_hugetlb_1g_maps_1g_leaves() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=2 * GB, page_size=GB)))
    region(v, 0, 0, 2 * GB, U)
    r = access(v, 0, 2 * GB)
    assert r["levels"] == {"4k": 0, "2m": 0, "1g": 2}
    assert r["mapped"] == 2 * 262144
    s = v.stats()
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"]) == (0, 0, 2)
    assert s["page_tables"] == 2  # root and L3
    assert leaf(v, GB + 0x1000)["level"] == 3
    check(v)


def test_hugetlb_1g_but_slot_not_covering_a_1g_region_maps_2m() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=2 * GB, page_size=GB)))
    region(v, 0, 2 * MB, GB, U + 2 * MB)
    r = access(v, 2 * MB, GB)
    assert r["levels"] == {"4k": 0, "2m": 512, "1g": 0}
    check(v)


def test_hugetlb_1g_with_hva_congruent_only_mod_2m_maps_2m() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=4 * GB, page_size=GB)))
    region(v, 0, 4 * GB, GB, U + GB + 4 * MB)
    r = access(v, 4 * GB, GB)
    assert r["levels"] == {"4k": 0, "2m": 512, "1g": 0}
    check(v)


def test_hugetlb_2m_pages_cap_the_level_at_2m() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=GB, page_size=2 * MB)))
    region(v, 0, 0, GB, U)
    r = access(v, 0, GB)
    assert r["levels"] == {"4k": 0, "2m": 512, "1g": 0}
    check(v)


def test_dirty_logging_slot_never_gets_huge_leaves() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U, flags=LOG)
    r = access(v, 0, 4 * MB)
    assert r["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    check(v)


# --------------------------------------------------------------------------- refaults
def test_refaults_count_pages_a_zap_removed(vm: Vm) -> None:
    access(vm, 0, 4 * MB)
    z = vm.apply(parse("zap", dict(scope="range", gpa=MB, size=16 * KB4)))
    assert z["sptes_zapped"]["4k"] == 16
    r = access(vm, 0, 4 * MB)
    assert (r["mapped"], r["refaults"], r["spurious"]) == (16, 16, 1008)
    assert vm.stats()["refaults"] == 16
    r = access(vm, 0, 4 * MB)
    assert r["refaults"] == 0
    assert vm.stats()["refaults"] == 16
    check(vm)


def test_refault_of_a_zapped_huge_leaf_counts_its_4k_pages() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    access(v, 0, 4 * MB)
    z = v.apply(parse("zap", dict(scope="range", gpa=0x1000, size=KB4)))  # inside the first 2M leaf
    assert (z["sptes_zapped"]["2m"], z["sptes_zapped"]["4k"]) == (1, 0)
    r = access(v, 0x1000, KB4, "read")
    assert (r["mapped"], r["refaults"], r["levels"]["2m"]) == (512, 512, 1)
    check(v)


# --------------------------------------------------------------------------- data
def test_store_load_and_host_memory_agree(vm: Vm) -> None:
    data = bytes(range(16)).hex()
    assert vm.apply(parse("store", dict(vcpu=0, gpa=0x1FF8, data=data))) == {}  # crosses a page
    assert vm.apply(parse("load", dict(vcpu=1, gpa=0x1FF8, len=16))) == {"data": data}
    assert vm.host_read(U + 0x1FF8, 16) == {"data": data}
    vm.apply(parse("host_write", dict(userspace_addr=U + 0x3000, data="c0ffee")))
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0x3000, len=3))) == {"data": "c0ffee"}
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0x2000 - 0x10, len=8))) == {"data": "00" * 8}
    check(vm)


def test_host_write_after_mapping_is_seen_by_the_guest(vm: Vm) -> None:
    access(vm, 0, 4 * MB)
    vm.apply(parse("host_write", dict(userspace_addr=U + 0x7000, data="11223344")))
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0x7000, len=4))) == {"data": "11223344"}
    check(vm)


def test_two_slots_aliasing_one_hva_see_the_same_bytes(vm: Vm) -> None:
    region(vm, 1, GB, MB, U + MB)  # GPA 1G aliases GPA 1M
    vm.apply(parse("store", dict(vcpu=0, gpa=MB + 0x40, data="5a5a")))
    assert vm.apply(parse("load", dict(vcpu=1, gpa=GB + 0x40, len=2))) == {"data": "5a5a"}
    assert leaf(vm, GB + 0x40)["pfn"] == leaf(vm, MB + 0x40)["pfn"]
    check(vm)


def test_load_running_off_the_slot_ends_in_an_mmio_exit(vm: Vm) -> None:
    r = vm.apply(parse("load", dict(vcpu=0, gpa=4 * MB - 4, len=8)))
    assert r["exit"]["reason"] == "KVM_EXIT_MMIO"
    assert r["exit"]["gpa"] == 4 * MB and r["exit"]["is_write"] is False


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, err",
    [
        (dict(vcpu=7, gpa=0, size=KB4, access="read"), errno.ENOENT),
        (dict(vcpu=0, gpa=0, size=KB4, access="fetch"), errno.EINVAL),
        (dict(vcpu=0, gpa=0, size=0, access="read"), errno.EINVAL),
        (dict(vcpu=0, gpa=-KB4, size=KB4, access="read"), errno.EINVAL),
        (dict(vcpu=0, gpa=(1 << 48) - KB4, size=2 * KB4, access="read"), errno.EINVAL),
    ],
)
def test_bad_access_requests(vm: Vm, args: dict, err: int) -> None:
    with pytest.raises(KvmError) as e:
        vm.apply(parse("access", args))
    assert e.value.errno == err


@pytest.mark.parametrize(
    "op, args",
    [
        ("load", dict(vcpu=0, gpa=0, len=0)),
        ("load", dict(vcpu=0, gpa=0, len=KB4 + 1)),
        ("store", dict(vcpu=0, gpa=0, data="")),
        ("store", dict(vcpu=0, gpa=0, data="zz")),
    ],
)
def test_bad_load_store_requests(vm: Vm, op: str, args: dict) -> None:
    with pytest.raises(KvmError) as e:
        vm.apply(parse(op, args))
    assert e.value.errno == errno.EINVAL


# -- regression cases from the engine review --------------------------------------------------
@pytest.mark.parametrize("budget", [5, 6, 7])
def test_tiny_budget_access_into_mmio_answers_the_mmio_exit(budget: int) -> None:
    vm = Vm.create(kit.DEFAULT, table_budget=budget)
    kit.region(vm, 0, 0, kit.PAGE, kit.HVA)
    r = kit.access(vm, 0, 2 * kit.PAGE)  # page 0 in the slot, page 1 is MMIO
    assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": kit.PAGE, "len": 8, "is_write": False}
    assert r["mapped"] == 1
    s = vm.stats()
    # No room for the MMIO SPTE's tables: KVM emulates without caching one.
    assert (s["pages_4k"], s["page_tables"], s["mmio_sptes"]) == (1, 4, 0)
    assert s["pf_mmio_spte_created"] == 0


def test_budget_with_room_still_caches_the_mmio_spte() -> None:
    vm = Vm.create(kit.DEFAULT, table_budget=8)
    kit.region(vm, 0, 0, kit.PAGE, kit.HVA)
    assert kit.access(vm, 0, 2 * kit.PAGE)["exit"]["reason"] == "KVM_EXIT_MMIO"
    assert vm.stats()["mmio_sptes"] == 1


@pytest.mark.parametrize("budget", [1, 4])
def test_budget_rejection_is_up_front_and_changes_nothing(budget: int) -> None:
    vm = Vm.create(kit.DEFAULT, table_budget=budget)
    kit.region(vm, 0, 0, kit.PAGE, kit.HVA)
    err = kit.rejected(vm, "access", dict(vcpu=0, gpa=0, size=2 * kit.PAGE))
    assert err.errno == errno.ENOMEM
    assert vm.stats()["pages_4k"] == 0


def test_huge_leaf_replacing_an_empty_table_costs_one_flush_request() -> None:
    vm = Vm.create(kit.DEFAULT)
    vm.apply(
        parse("enable_cap", dict(cap=kit.DISABLE_QUIRKS2, args=[kit.SLOT_ZAP_ALL]))
    )  # precise zaps
    vm.apply(parse("host_map", dict(userspace_addr=kit.HVA, len=kit.M2, page_size=kit.M2)))
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0)  # one 2M leaf at gfn 0
    kit.region(vm, 1, 4 * kit.MB, kit.PAGE, 2 * kit.HVA)
    kit.access(vm, 4 * kit.MB)  # a 4K leaf in a level-1 table at 4M
    assert vm.stats()["page_tables"] == 4
    kit.region(vm, 1, 0, 0, 0)  # precise zap: the emptied table stays
    assert vm.stats()["page_tables"] == 4
    vm.apply(parse("host_map", dict(userspace_addr=2 * kit.HVA, len=kit.M2, page_size=kit.M2)))
    kit.region(vm, 1, 4 * kit.MB, kit.M2, 2 * kit.HVA)
    before = vm.stats()["remote_tlb_flush_requests"]
    r = kit.access(vm, 4 * kit.MB)
    assert r["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    s = vm.stats()
    assert s["remote_tlb_flush_requests"] - before == 1
    assert (s["page_tables"], s["pages_2m"], s["pages_4k"]) == (3, 2, 0)
    assert vm.audit()["ok"] is True


def test_huge_leaf_replacing_a_table_is_not_zapped_not_refaulted() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0, kit.MB)  # first half mapped at 4K
    kit.hugepage(vm, kit.HVA, kit.M2)
    r = kit.access(vm, kit.MB)  # a 2M leaf replaces the 4K table
    assert r["levels"] == {"4k": 0, "2m": 1, "1g": 0}
    s = vm.stats()
    assert (s["zapped_not_refaulted"], s["remote_tlb_flush_requests"]) == (0, 1)
    assert (s["pages_4k"], s["pages_2m"]) == (0, 1)
    r = kit.access(vm, 0)  # already mapped by the 2M leaf
    assert (r["refaults"], r["spurious"]) == (0, 1)
    assert vm.stats()["zapped_not_refaulted"] == 0
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 2


def test_pf_stats_count_per_leaf_and_new_mmio_sptes_only() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, 4 * kit.MB, kit.HVA)
    kit.access(vm, 0, 4 * kit.MB)  # 1024 new 4K leaves
    s = vm.stats()
    assert (s["pf_taken"], s["pf_fixed"]) == (1024, 1024)
    for _ in range(3):
        r = kit.access(vm, kit.GB, 4)  # the same MMIO gpa three times
        assert r["exit"] == {"reason": "KVM_EXIT_MMIO", "gpa": kit.GB, "len": 4, "is_write": False}
    s = vm.stats()
    assert (s["pf_mmio_spte_created"], s["mmio_sptes"]) == (1, 1)
    # Only the fault that created the MMIO SPTE is a page fault; later hits take the fast path.
    assert (s["pf_taken"], s["pf_fixed"]) == (1025, 1024)
    kit.access(vm, 0, 4 * kit.MB)  # all present: no new faults
    s = vm.stats()
    assert (s["pf_taken"], s["pf_fixed"]) == (1025, 1024)


def test_present_4k_leaves_under_later_thp_advice_are_plain_touches() -> None:
    """4K leaves mapped before THP advice: touching them is no fault and always progresses;
    a missing neighbour then faults a 2M leaf that replaces the table (one flush)."""
    vm = Vm.create(kit.DEFAULT, 1)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0, 2 * kit.PAGE)
    vm.apply(parse("host_advise", dict(userspace_addr=kit.HVA, len=kit.M2, advice="hugepage")))
    assert vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=kit.PAGE))) == {
        "gpa": kit.PAGE,
        "size": 0,
    }
    r = kit.access(vm, 0, 2 * kit.PAGE)
    assert (r["pages"], r["spurious"], r["mapped"]) == (2, 2, 0)
    flushes = vm.stats()["remote_tlb_flush_requests"]
    r = kit.access(vm, 0, kit.M2)
    assert (r["pages"], r["spurious"], r["levels"]) == (512, 2, {"4k": 0, "2m": 1, "1g": 0})
    assert vm.stats()["remote_tlb_flush_requests"] == flushes + 1
    assert (vm.stats()["pages_4k"], vm.stats()["pages_2m"]) == (0, 1)
    assert vm.audit()["ok"]


def test_failed_pre_fault_that_built_tables_says_state_changed() -> None:
    """ENOENT from pre-fault of a hole: the walk built a root, tables and an MMIO SPTE first (as
    the kernel's does), so the error is flagged for the journal; the vCPU holds that root."""
    vm = Vm.create(kit.DEFAULT, 1)
    d0 = codec.digest(vm)
    with pytest.raises(KvmError) as e:
        vm.apply(parse("pre_fault", dict(vcpu=0, gpa=0, size=kit.PAGE)))
    assert e.value.errno == errno.ENOENT and e.value.state_changed
    assert codec.digest(vm) != d0
    assert vm.vcpus_view()[0]["roots"] == {"direct": vm.roots()[0]["id"]}


def test_an_instruction_fetch_without_a_memslot_is_an_emulation_failure_not_mmio() -> None:
    """kvm_handle_noslot_fault caches an MMIO SPTE and asks for emulation; the emulator cannot
    fetch instruction bytes from a GPA without a memslot (reexecute_instruction finds no slot),
    so handle_emulation_failure exits with KVM_EXIT_INTERNAL_ERROR /
    KVM_INTERNAL_ERROR_EMULATION for a CPL-0 guest. Loads and stores there stay MMIO exits."""
    vm = Vm.create(kit.DEFAULT, 1)
    out = access(vm, 0x1000_0000, kind="exec")
    assert out["exit"] == {
        "reason": "KVM_EXIT_INTERNAL_ERROR",
        "suberror": 1,
        "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
    }
    assert vm.stats()["mmio_sptes"] == 1  # the MMIO SPTE is installed all the same
    again = access(vm, 0x1000_0000, kind="exec")["exit"]
    assert again is not None and again["reason"] == "KVM_EXIT_INTERNAL_ERROR"
    assert access(vm, 0x1000_0000, kind="read")["exit"]["reason"] == "KVM_EXIT_MMIO"


def test_a_td_fetching_from_a_shared_gpa_without_a_memslot_is_still_a_kvm_bug() -> None:
    """tdx_handle_ept_violation's KVM_BUG_ON on an exec EPT violation of a shared GPA comes
    before any memslot lookup: EIO, the VM is dead."""
    td = Vm.create(kit.TDX, 1)
    with pytest.raises(KvmError) as e:
        access(td, (1 << 47) | 0x1000_0000, kind="exec")
    assert e.value.errno == errno.EIO and td.bugged
