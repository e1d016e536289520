"""The VMM's memory behind userspace_addr: contents, MADV_DONTNEED through KVM's MMU notifier,
THP advice and hugetlbfs mappings (kvm-memslots.md §5.1 "mmu-notifier invalidation", §8.2;
kvm-private-tdx.md §7 rule 16)."""

from __future__ import annotations

import errno

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse

from .mmu import check, leaf, pages, region

U = 0x7F00_0000_0000
KB4, MB, GB = 1 << 12, 1 << 20, 1 << 30


def access(vm: Vm, gpa: int, size: int = KB4, kind: str = "write", vcpu: int = 0) -> dict:
    return vm.apply(parse("access", dict(vcpu=vcpu, gpa=gpa, size=size, access=kind)))


def load(vm: Vm, gpa: int, n: int) -> dict:
    return vm.apply(parse("load", dict(vcpu=0, gpa=gpa, len=n)))


def discard(vm: Vm, hva: int, n: int) -> dict:
    return vm.apply(parse("host_discard", dict(userspace_addr=hva, len=n)))


@pytest.fixture
def vm() -> Vm:
    """slot 0 = [0, 4M) at U; slot 1 = [8M, 10M) aliasing U+1M..U+3M; all mapped 4K."""
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    region(v, 1, 8 * MB, 2 * MB, U + MB)
    access(v, 0, 4 * MB)
    access(v, 8 * MB, 2 * MB, "read")
    assert pages(v) == (1536, 0, 0)
    return v


# --------------------------------------------------------------------------- contents
def test_host_write_and_read_round_trip_across_pages() -> None:
    v = Vm.create(0, 1)
    data = bytes(range(256)) * 20  # 5120 bytes over two pages
    assert (
        v.apply(parse("host_write", dict(userspace_addr=U + 0xF00, data=data.hex())))["written"]
        == 5120
    )
    assert v.host_read(U + 0xF00, len(data)) == {"data": data.hex()}
    assert v.host_read(U + 0xE00, 0x100) == {"data": "00" * 0x100}


def test_guest_stores_are_host_bytes_and_host_writes_are_guest_loads(vm: Vm) -> None:
    vm.apply(parse("store", dict(vcpu=0, gpa=0x1_0000, data="a1a2a3")))
    assert vm.host_read(U + 0x1_0000, 3) == {"data": "a1a2a3"}
    vm.apply(parse("host_write", dict(userspace_addr=U + MB + 0x20, data="beef")))
    assert load(vm, MB + 0x20, 2) == {"data": "beef"}
    assert load(vm, 8 * MB + 0x20, 2) == {"data": "beef"}  # the alias slot
    check(vm)


def test_host_read_over_one_mib_is_e2big() -> None:
    v = Vm.create(0, 1)
    with pytest.raises(KvmError) as e:
        v.host_read(U, MB + 1)
    assert e.value.errno == errno.E2BIG


@pytest.mark.parametrize(
    "addr, n",
    [(0x7FFF_FFFF_F000, 2 * KB4), (U, 0)],
)
def test_host_range_outside_user_space_or_empty_is_einval(addr: int, n: int) -> None:
    v = Vm.create(0, 1)
    with pytest.raises(KvmError) as e:
        v.apply(parse("host_discard", dict(userspace_addr=addr, len=n)))
    assert e.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- notifier
def test_discard_zaps_exactly_the_sptes_mapping_the_range(vm: Vm) -> None:
    vm.apply(parse("store", dict(vcpu=0, gpa=0x18_0000, data="aabb")))
    f0 = vm.stats()["remote_tlb_flush_requests"]
    z = discard(vm, U + 0x18_0000, 3 * KB4)["zap"]
    assert (z["cause"], z["path"]) == ("mmu_notifier", "zap_gfn_range")
    # Three host pages, each mapped by slot 0 and by the alias slot 1.
    assert z["sptes_zapped"]["4k"] == 6 and z["sptes_zapped_total"] == 6
    assert z["tlb_flushes"] == 1
    assert vm.stats()["remote_tlb_flush_requests"] == f0 + 1
    assert vm.stats()["zaps_notifier"] == 1
    assert pages(vm) == (1530, 0, 0)
    for gpa in (0x18_0000, 0x18_2000, 8 * MB + 0x8_0000, 8 * MB + 0x8_2000):
        assert leaf(vm, gpa) is None
    for gpa in (0x17_F000, 0x18_3000, 8 * MB + 0x7_F000, 8 * MB + 0x8_3000):
        assert leaf(vm, gpa) is not None
    assert vm.roots()[0]["valid"] is True  # not a fast zap
    check(vm)


def test_discarded_memory_reads_back_zero_and_refaults(vm: Vm) -> None:
    vm.apply(parse("store", dict(vcpu=0, gpa=0x18_0010, data="aabbccdd")))
    discard(vm, U + 0x18_0000, KB4)
    assert vm.host_read(U + 0x18_0010, 4) == {"data": "00000000"}
    r = access(vm, 0x18_0000, KB4, "read")
    assert (r["mapped"], r["refaults"]) == (1, 1)
    assert load(vm, 0x18_0010, 4) == {"data": "00000000"}
    assert load(vm, 8 * MB + 0x8_0010, 4) == {"data": "00000000"}
    # New bytes after the discard are seen through both GPAs.
    vm.apply(parse("store", dict(vcpu=0, gpa=8 * MB + 0x8_0010, data="0102")))
    assert load(vm, 0x18_0010, 2) == {"data": "0102"}
    check(vm)


def test_discard_of_memory_no_slot_maps_is_no_zap(vm: Vm) -> None:
    assert discard(vm, U + 512 * MB, 16 * KB4) == {"zap": None}
    assert pages(vm) == (1536, 0, 0)
    assert vm.zap_events() == []


def test_discard_of_unfaulted_slot_memory_zaps_nothing_and_does_not_flush() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    access(v, 0, KB4)
    z = discard(v, U + MB, MB)["zap"]
    assert z is not None and z["sptes_zapped_total"] == 0
    assert z["tlb_flushes"] == 0
    assert v.stats()["remote_tlb_flush_requests"] == 0
    assert pages(v) == (1, 0, 0)


def test_discard_inside_a_huge_leaf_zaps_the_whole_leaf() -> None:
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    access(v, 0, 4 * MB)
    v.apply(parse("store", dict(vcpu=0, gpa=0x10, data="99")))
    z = discard(v, U + 2 * MB + 5 * KB4, KB4)["zap"]
    assert (z["sptes_zapped"]["2m"], z["sptes_zapped"]["4k"]) == (1, 0)
    assert pages(v) == (0, 1, 0)
    assert leaf(v, 2 * MB) is None and leaf(v, 0)["level"] == 2
    assert load(v, 0x10, 1) == {"data": "99"}
    check(v)


def test_discard_inside_a_thp_splits_the_host_huge_page() -> None:
    """MADV_DONTNEED on part of a THP splits its PMD: from then on the host maps that 2M
    region with 4K pages, so KVM's host mapping level there is 4K (§8.2)."""
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(v, 0, 0, 4 * MB, U)
    access(v, 0, 4 * MB)
    discard(v, U + 5 * KB4, KB4)
    r = access(v, 0, 4 * MB, "read")
    assert r["levels"] == {"4k": 512, "2m": 0, "1g": 0}
    assert r["spurious"] == 512  # the second 2M leaf was untouched
    assert pages(v) == (512, 1, 0)
    check(v)


def test_one_touch_populates_a_whole_hugetlb_page() -> None:
    """A hugetlbfs page is populated whole: after one 4K fault (dirty logging forces 4K
    SPTEs) the host maps the full 2M page, so recovering a 2M leaf later maps no freed page."""
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=2 * MB, page_size=2 * MB)))
    region(v, 0, 0, 2 * MB, U, flags=1)
    assert load(v, 0, 1) == {"data": "00"}
    r = region(v, 0, 0, 2 * MB, U, flags=0)
    assert r["zap"]["huge_pages_recovered"] == 1
    assert pages(v) == (0, 1, 0)
    assert load(v, MB, 1) == {"data": "00"}
    check(v)


def test_discard_whole_slot_then_guest_sees_zeroes() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, 2 * MB, U)
    for p in range(0, 512, 37):
        v.apply(parse("store", dict(vcpu=0, gpa=p * KB4 + 7, data="ff")))
    z = discard(v, U, 2 * MB)["zap"]
    assert z["sptes_zapped"]["4k"] == len(range(0, 512, 37))
    for p in range(0, 512, 37):
        assert load(v, p * KB4 + 7, 1) == {"data": "00"}
    check(v)


# --------------------------------------------------------------------------- page size
def test_nohugepage_advice_keeps_populated_thps_and_only_new_host_faults_get_4k() -> None:
    """mm/khugepaged.c hugepage_madvise only changes the VMA's flags: a THP already populated
    stays (host_pfn_mapping_level still walks to a PMD), so a refault after a zap maps 2M
    again; a region populated only later, or discarded and faulted again, gets 4 KiB."""
    v = Vm.create(0, 1)
    v.apply(parse("host_advise", dict(userspace_addr=U, len=8 * MB, advice="hugepage")))
    region(v, 0, 0, 8 * MB, U)
    access(v, 0, 4 * MB)  # populates the THPs of [0, 4M) only
    v.apply(parse("host_advise", dict(userspace_addr=U, len=8 * MB, advice="nohugepage")))
    assert pages(v) == (0, 2, 0)
    v.apply(parse("zap", dict(scope="range", gpa=0, size=8 * MB)))
    assert access(v, 0, 4 * MB)["levels"] == {"4k": 0, "2m": 2, "1g": 0}
    assert access(v, 4 * MB, 4 * MB)["levels"] == {"4k": 1024, "2m": 0, "1g": 0}
    discard(v, U, 2 * MB)  # MADV_DONTNEED frees the first THP; the refault is a new fault
    assert access(v, 0, 2 * MB)["levels"] == {"4k": 512, "2m": 0, "1g": 0}
    check(v)


def test_discard_on_hugetlbfs_rounds_the_end_down_to_whole_huge_pages() -> None:
    """mm/madvise.c (madvise_dontneed_free_valid_vma, since the 2023 "fix unexpected data loss
    with MADV_DONTNEED on hugetlbfs", also in stable): the start must be huge-page aligned
    (EINVAL), the end is rounded DOWN to a huge page, and an empty result frees nothing."""
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=4 * MB, page_size=2 * MB)))
    region(v, 0, 0, 4 * MB, U)
    v.apply(parse("store", dict(vcpu=0, gpa=0x10, data="11")))
    v.apply(parse("store", dict(vcpu=0, gpa=2 * MB + 0x10, data="22")))
    with pytest.raises(KvmError) as e:
        discard(v, U + KB4, 2 * MB)
    assert e.value.errno == errno.EINVAL
    assert discard(v, U, KB4) == {"zap": None}  # rounds down to nothing
    assert load(v, 0x10, 1) == {"data": "11"}
    z = discard(v, U, 2 * MB + KB4)["zap"]  # only the first huge page goes
    assert z["sptes_zapped"]["2m"] == 1
    assert load(v, 0x10, 1) == {"data": "00"}
    assert load(v, 2 * MB + 0x10, 1) == {"data": "22"}
    check(v)


@pytest.mark.parametrize("advice", ["nohugepage", "hugepage"])
def test_thp_advice_does_not_change_a_hugetlbfs_mapping(advice: str) -> None:
    """THP advice acts on anonymous/shmem memory; a hugetlbfs mapping keeps its page size,
    so KVM's host mapping level there stays 1G (§8.2)."""
    v = Vm.create(0, 1)
    v.apply(parse("host_map", dict(userspace_addr=U, len=GB, page_size=GB)))
    v.apply(parse("host_advise", dict(userspace_addr=U, len=GB, advice=advice)))
    region(v, 0, 0, GB, U)
    assert access(v, 0, GB)["levels"] == {"4k": 0, "2m": 0, "1g": 1}
    check(v)


@pytest.mark.parametrize(
    "args",
    [
        dict(userspace_addr=U + 0x800, len=2 * MB, advice="hugepage"),  # not page aligned
        dict(userspace_addr=U, len=2 * MB, advice="huge"),  # unknown advice
    ],
)
def test_bad_advice_is_einval(args: dict) -> None:
    v = Vm.create(0, 1)
    with pytest.raises(KvmError) as e:
        v.apply(parse("host_advise", args))
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "addr, n, ps",
    [
        (U + 4 * KB4, 2 * MB, 2 * MB),  # address not aligned to the page size
        (U, 3 * MB, 2 * MB),  # length not a multiple of it
        (U, 2 * MB, 8 * KB4),  # not a page size
    ],
)
def test_bad_hugetlb_map_is_einval(addr: int, n: int, ps: int) -> None:
    v = Vm.create(0, 1)
    with pytest.raises(KvmError) as e:
        v.apply(parse("host_map", dict(userspace_addr=addr, len=n, page_size=ps)))
    assert e.value.errno == errno.EINVAL


def test_hugetlb_map_over_mapped_memory_replaces_it_through_the_notifier() -> None:
    v = Vm.create(0, 1)
    region(v, 0, 0, 4 * MB, U)
    access(v, 0, 4 * MB)
    v.apply(parse("store", dict(vcpu=0, gpa=0x100, data="42")))
    z = v.apply(parse("host_map", dict(userspace_addr=U, len=4 * MB, page_size=2 * MB)))["zap"]
    assert z["cause"] == "mmu_notifier" and z["sptes_zapped"]["4k"] == 1024
    assert pages(v) == (0, 0, 0)
    assert access(v, 0, 4 * MB)["levels"] == {"4k": 0, "2m": 2, "1g": 0}
    assert load(v, 0x100, 1) == {"data": "00"}  # a fresh mapping: new, zeroed pages
    check(v)
