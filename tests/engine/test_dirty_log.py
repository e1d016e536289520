"""Dirty logging: KVM_MEM_LOG_DIRTY_PAGES toggles, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG with
manual protect (kvm-memslots.md §2.2, §2.3, §3.4, §5.3, §7, §8.2)."""

from __future__ import annotations

import base64
import errno

import pytest

from app.engine import KvmError, Vm
from app.engine.ops import parse
from tests.engine import mmu as kit

from .mmu import check, pages, region

U = 0x7F00_0000_0000
KB4, MB = 1 << 12, 1 << 20
LOG = 1
MANUAL, INITIALLY_SET = 1, 2


def access(vm: Vm, gpa: int, size: int = KB4, kind: str = "write") -> dict:
    return vm.apply(parse("access", dict(vcpu=0, gpa=gpa, size=size, access=kind)))


def leaf(vm: Vm, gpa: int) -> dict | None:
    (root,) = [r for r in vm.translate(gpa)["roots"] if r["valid"]]
    last = root["walk"][-1]
    return last if last.get("present") and last.get("leaf") else None


def flushes(vm: Vm) -> int:
    return vm.stats()["remote_tlb_flush_requests"]


def bits_of(log: dict) -> list[int]:
    """Set bit numbers of the kernel bitmap: little-endian u64 words, bit i = page i."""
    raw = base64.b64decode(log["bitmap"])
    assert len(raw) % 8 == 0
    out = []
    for w in range(len(raw) // 8):
        word = int.from_bytes(raw[8 * w : 8 * w + 8], "little")
        out += [64 * w + b for b in range(64) if word >> b & 1]
    return out


def bitmap(nbits: int, set_bits: list[int]) -> str:
    words = [0] * (-(-nbits // 64))
    for b in set_bits:
        words[b // 64] |= 1 << (b % 64)
    return base64.b64encode(b"".join(w.to_bytes(8, "little") for w in words)).decode()


def get_log(vm: Vm, slot: int = 0) -> dict:
    return vm.apply(parse("get_dirty_log", dict(slot=slot)))


def clear_log(vm: Vm, first: int, num: int, bm: str, slot: int = 0) -> dict:
    return vm.apply(
        parse("clear_dirty_log", dict(slot=slot, first_page=first, num_pages=num, bitmap=bm))
    )


def huge_vm(manual: int = 0) -> Vm:
    """slot 0 = [0, 4M) on THP, fully written: two 2M leaves, three tables."""
    vm = Vm.create(0, 1)
    if manual:
        vm.apply(
            parse(
                "enable_cap", dict(cap="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", args=[manual, 0, 0, 0])
            )
        )
    vm.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, U)
    access(vm, 0, 4 * MB)
    assert pages(vm) == (0, 2, 0) and vm.stats()["page_tables"] == 3
    return vm


# --------------------------------------------------------------------------- enabling
def test_enabling_splits_huge_pages_and_write_protects() -> None:
    vm = huge_vm()
    f0 = flushes(vm)
    r = region(vm, 0, 0, 4 * MB, U, flags=LOG)
    assert r["change"] == "flags_only"
    z = r["zap"]
    assert z["cause"] == "dirty_log"
    assert z["huge_pages_split"] == 2
    assert z["sptes_write_protected"] == 1024
    assert z["sptes_zapped_total"] == 0  # a split is not a zap
    assert z["tlb_flushes"] == 1
    assert flushes(vm) == f0 + 1
    assert pages(vm) == (1024, 0, 0)  # +512 at 4K, -1 at 2M, twice
    assert vm.stats()["page_tables"] == 5
    e = leaf(vm, 0x3000)
    assert e["level"] == 1 and e["w"] is False
    assert e["mmu_writable"] is True  # the fast path may restore W
    assert e["pfn"] == (U >> 12) + 3
    assert r["memslot"]["dirty_logging"] is True
    assert get_log(vm)["dirty_count"] == 0
    check(vm)


def test_enabling_flushes_even_when_nothing_is_mapped() -> None:
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 4 * MB, U)
    r = region(vm, 0, 0, 4 * MB, U, flags=LOG)
    assert r["zap"]["tlb_flushes"] == 1
    assert r["zap"]["huge_pages_split"] == 0 and r["zap"]["sptes_write_protected"] == 0
    assert flushes(vm) == 1


def test_faults_in_a_logging_slot_are_4k_and_writes_mark_pages_dirty() -> None:
    vm = Vm.create(0, 1)
    vm.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    r = access(vm, 0x5000, 2 * KB4, "write")
    assert r["levels"] == {"4k": 2, "2m": 0, "1g": 0}
    log = get_log(vm)
    assert bits_of(log) == [5, 6] and log["dirty_count"] == 2
    check(vm)


# --------------------------------------------------------------------------- GET_DIRTY_LOG
def test_writes_mark_dirty_through_the_fast_path_and_get_returns_le_u64_words() -> None:
    vm = huge_vm()
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    pf_fast = vm.stats()["pf_fast"]
    for p in (3, 4, 65, 1023):
        r = access(vm, p * KB4, KB4, "write")
        assert (r["mapped"], r["write_protect_fixed"]) == (0, 1)
    assert vm.stats()["pf_fast"] == pf_fast + 4
    # Reads of present pages dirty nothing.
    access(vm, 0, 4 * MB, "read")
    log = get_log(vm)
    assert (log["first_page"], log["num_pages"], log["dirty_count"]) == (0, 1024, 4)
    raw = base64.b64decode(log["bitmap"])
    assert len(raw) == 1024 // 8
    assert raw[0] == 0x18  # word 0: bits 3 and 4
    assert raw[8] == 0x02  # word 1: bit 1 (page 65)
    assert raw[127] == 0x80  # word 15: bit 63 (page 1023)
    assert bits_of(log) == [3, 4, 65, 1023]
    check(vm)


def test_get_dirty_log_is_destructive_and_rearms_write_protection() -> None:
    vm = huge_vm()
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 3 * KB4, 2 * KB4, "write")
    assert leaf(vm, 3 * KB4)["w"] is True
    f0 = flushes(vm)
    log = get_log(vm)
    assert bits_of(log) == [3, 4]
    assert log["sptes_write_protected"] == 2
    assert flushes(vm) == f0 + 1
    assert leaf(vm, 3 * KB4)["w"] is False and leaf(vm, 4 * KB4)["w"] is False
    # Second call: nothing dirty, nothing to protect, no flush.
    log2 = get_log(vm)
    assert log2["dirty_count"] == 0 and bits_of(log2) == []
    assert flushes(vm) == f0 + 1
    # Writing again dirties again.
    r = access(vm, 4 * KB4, KB4, "write")
    assert r["write_protect_fixed"] == 1
    assert bits_of(get_log(vm)) == [4]
    check(vm)


def test_dirty_bitmap_size_rounds_up_to_u64_words() -> None:
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 100 * KB4, U, flags=LOG)
    access(vm, 99 * KB4, KB4, "write")
    log = get_log(vm)
    assert log["num_pages"] == 100
    assert len(base64.b64decode(log["bitmap"])) == 16
    assert bits_of(log) == [99]


@pytest.mark.parametrize(
    "slot, err",
    [(0, errno.ENOENT), (5, errno.ENOENT), (32764, errno.EINVAL), (2 << 16, errno.EINVAL)],
)
def test_get_dirty_log_errors(slot: int, err: int) -> None:
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 4 * MB, U)  # no logging
    with pytest.raises(KvmError) as e:
        get_log(vm, slot)
    assert e.value.errno == err


def test_move_keeps_the_dirty_bitmap() -> None:
    """§2.2: MOVE reuses the old bitmap (not cleared) when logging stays on."""
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 7 * KB4, KB4, "write")
    region(vm, 0, 64 * MB, 4 * MB, U, flags=LOG)
    assert bits_of(get_log(vm)) == [7]
    access(vm, 64 * MB + 9 * KB4, KB4, "write")
    assert bits_of(get_log(vm)) == [9]
    check(vm)


def test_delete_frees_the_bitmap_and_a_new_slot_starts_clean() -> None:
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 0, 4 * MB, "write")
    region(vm, 0, 0, 0, 0)
    with pytest.raises(KvmError) as e:
        get_log(vm)
    assert e.value.errno == errno.ENOENT
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    assert get_log(vm)["dirty_count"] == 0


# --------------------------------------------------------------------------- disabling
def test_disabling_recovers_huge_pages() -> None:
    vm = huge_vm()
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 0, 4 * MB, "write")
    f0 = flushes(vm)
    r = region(vm, 0, 0, 4 * MB, U, flags=0)
    z = r["zap"]
    assert r["change"] == "flags_only"
    assert z["huge_pages_recovered"] == 2
    assert z["tables_freed"] == 2
    assert z["tlb_flushes"] == 1 and flushes(vm) == f0 + 1
    assert pages(vm) == (0, 2, 0)
    assert vm.stats()["page_tables"] == 3
    assert leaf(vm, 2 * MB)["level"] == 2
    assert r["memslot"]["dirty_logging"] is False
    with pytest.raises(KvmError) as e:
        get_log(vm)
    assert e.value.errno == errno.ENOENT
    # Recovery is not a loss of mapping: touching the memory again is spurious.
    r = access(vm, 0, 4 * MB, "read")
    assert (r["mapped"], r["refaults"]) == (0, 0)
    check(vm)


def test_disabling_without_anything_to_recover_does_not_flush() -> None:
    vm = Vm.create(0, 1)  # no THP: nothing may be mapped huge
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 0, 4 * MB, "write")
    f0 = flushes(vm)
    r = region(vm, 0, 0, 4 * MB, U, flags=0)
    assert r["zap"]["huge_pages_recovered"] == 0
    assert r["zap"]["tlb_flushes"] == 0 and flushes(vm) == f0
    assert pages(vm) == (1024, 0, 0)
    check(vm)


def test_disabling_recovers_a_region_with_holes_but_not_an_empty_table() -> None:
    """The TDP MMU builds the huge SPTE from the first present leaf under a table; a table
    with no present leaf at all is skipped (§3.4, "recover huge pages")."""
    vm = huge_vm()
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    vm.apply(parse("zap", dict(scope="range", gpa=0, size=KB4)))  # a hole in the first 2M
    vm.apply(parse("zap", dict(scope="range", gpa=2 * MB, size=2 * MB)))  # the second 2M emptied
    assert pages(vm) == (511, 0, 0)
    r = region(vm, 0, 0, 4 * MB, U, flags=0)
    assert r["zap"]["huge_pages_recovered"] == 1
    assert pages(vm) == (0, 1, 0)
    assert leaf(vm, 0)["level"] == 2 and leaf(vm, 0)["pfn"] == U >> 12
    assert leaf(vm, 2 * MB) is None
    assert vm.stats()["page_tables"] == 4  # the empty L1 table stays linked
    check(vm)


def test_enabling_logging_on_a_readonly_slot_keeps_its_huge_leaves() -> None:
    """§3.4: "If the slot is READONLY: nothing more" — no split, no write-protect; a
    read-only page can never be dirtied, so its huge leaves stay (and are legal)."""
    vm = Vm.create(0, 1)
    vm.apply(parse("host_advise", dict(userspace_addr=U, len=4 * MB, advice="hugepage")))
    region(vm, 0, 0, 4 * MB, U, flags=2)
    access(vm, 0, 4 * MB, "read")
    assert pages(vm) == (0, 2, 0)
    f0 = flushes(vm)
    r = region(vm, 0, 0, 4 * MB, U, flags=2 | LOG)
    assert r["change"] == "flags_only"
    assert pages(vm) == (0, 2, 0)
    assert flushes(vm) == f0
    assert get_log(vm)["dirty_count"] == 0
    check(vm)


def test_recovery_never_maps_a_discarded_host_page() -> None:
    """MADV_DONTNEED of one 4K page inside a THP splits the host huge mapping, so the host
    mapping level of that 2M region drops to 4K (§8.2) and it cannot be recovered."""
    vm = huge_vm()
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    vm.apply(parse("host_discard", dict(userspace_addr=U + 5 * KB4, len=KB4)))
    assert pages(vm) == (1023, 0, 0)
    r = region(vm, 0, 0, 4 * MB, U, flags=0)
    assert r["zap"]["huge_pages_recovered"] == 1
    assert pages(vm) == (511, 1, 0)
    assert leaf(vm, 0)["level"] == 1 and leaf(vm, 2 * MB)["level"] == 2
    assert vm.apply(parse("load", dict(vcpu=0, gpa=5 * KB4, len=4))) == {"data": "00000000"}
    check(vm)


def test_recovery_after_late_thp_advice_never_maps_a_discarded_page() -> None:
    """The 4K host pages were populated (and one discarded) before MADV_HUGEPAGE: nothing may
    map the discarded page afterwards (kvm-private-tdx.md §7 rule 16), and it reads as zero.
    (Linux keeps such a range PTE-mapped until khugepaged collapses it.)"""
    vm = Vm.create(0, 1)
    region(vm, 0, 0, 2 * MB, U)
    access(vm, 0, 2 * MB, "read")
    region(vm, 0, 0, 2 * MB, U, flags=LOG)
    vm.apply(parse("host_discard", dict(userspace_addr=U, len=KB4)))
    vm.apply(parse("host_advise", dict(userspace_addr=U, len=2 * MB, advice="hugepage")))
    region(vm, 0, 0, 2 * MB, U, flags=0)
    check(vm)
    assert vm.apply(parse("load", dict(vcpu=0, gpa=0x10, len=4))) == {"data": "00000000"}
    check(vm)


# --------------------------------------------------------------------------- manual protect
def test_manual_protect_get_is_not_destructive() -> None:
    vm = huge_vm(MANUAL)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)  # without INITIALLY_SET: protected at enable
    assert pages(vm) == (1024, 0, 0)
    access(vm, 3 * KB4, 2 * KB4, "write")
    f0 = flushes(vm)
    assert bits_of(get_log(vm)) == [3, 4]
    assert bits_of(get_log(vm)) == [3, 4]
    assert flushes(vm) == f0
    assert leaf(vm, 3 * KB4)["w"] is True


def test_clear_dirty_log_clears_and_protects_only_the_given_pages() -> None:
    vm = huge_vm(MANUAL)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    access(vm, 3 * KB4, 2 * KB4, "write")
    f0 = flushes(vm)
    r = clear_log(vm, 0, 64, bitmap(64, [3, 10]))  # page 10 is not dirty: ignored
    assert r["cleared"] == 1
    assert flushes(vm) == f0 + 1
    assert bits_of(get_log(vm)) == [4]
    assert leaf(vm, 3 * KB4)["w"] is False
    assert leaf(vm, 4 * KB4)["w"] is True
    check(vm)


def test_clear_dirty_log_with_nothing_to_clear_does_not_flush() -> None:
    vm = huge_vm(MANUAL)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    f0 = flushes(vm)
    r = clear_log(vm, 0, 1024, bitmap(1024, [1, 2, 3]))
    assert r["cleared"] == 0
    assert flushes(vm) == f0


def test_initially_set_starts_all_dirty_and_protects_on_clear() -> None:
    vm = huge_vm(MANUAL | INITIALLY_SET)
    f0 = flushes(vm)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    # §3.4 (a): no split, no write protection, no flush at enable time.
    assert pages(vm) == (0, 2, 0)
    assert flushes(vm) == f0
    log = get_log(vm)
    assert log["dirty_count"] == 1024 and bits_of(log) == list(range(1024))
    r = clear_log(vm, 0, 64, bitmap(64, list(range(64))))
    assert r["cleared"] == 64
    # The covering 2M page is split and the 64 cleared pages are write-protected.
    assert pages(vm) == (512, 1, 0)
    assert leaf(vm, 0)["w"] is False and leaf(vm, 63 * KB4)["w"] is False
    assert leaf(vm, 64 * KB4)["w"] is True
    assert leaf(vm, 2 * MB)["level"] == 2
    assert get_log(vm)["dirty_count"] == 1024 - 64
    check(vm)


@pytest.mark.parametrize(
    "first, num, err",
    [
        (1, 64, errno.EINVAL),  # first_page not 64-aligned
        (0, 10, errno.EINVAL),  # num_pages not a multiple of 64 and not ending the slot
        (0, 1025, errno.EINVAL),  # beyond the slot
        (1088, 0, errno.EINVAL),  # first_page beyond the slot
    ],
)
def test_clear_dirty_log_range_rules(first: int, num: int, err: int) -> None:
    vm = huge_vm(MANUAL)
    region(vm, 0, 0, 4 * MB, U, flags=LOG)
    with pytest.raises(KvmError) as e:
        clear_log(vm, first, num, bitmap(max(num, 64), []))
    assert e.value.errno == err


def test_clear_dirty_log_num_pages_may_be_unaligned_when_it_ends_the_slot() -> None:
    vm = Vm.create(0, 1)
    vm.apply(
        parse("enable_cap", dict(cap="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", args=[MANUAL, 0, 0, 0]))
    )
    region(vm, 0, 0, 100 * KB4, U, flags=LOG)
    access(vm, 99 * KB4, KB4, "write")
    assert clear_log(vm, 64, 36, bitmap(36, [35]))["cleared"] == 1
    assert get_log(vm)["dirty_count"] == 0


@pytest.mark.parametrize("first", [0, 64])
def test_clear_dirty_log_of_a_whole_word_past_an_unaligned_slot_end_is_einval(first: int) -> None:
    """kvm_clear_dirty_log_protect: num_pages > npages - first_page is EINVAL even when it is
    a multiple of 64, as for the last word of a 100-page slot (128 pages asked for from 0, or
    64 from 64); the bitmap and the leaves stay as they were."""
    vm = Vm.create(0, 1)
    vm.apply(
        parse("enable_cap", dict(cap="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", args=[MANUAL, 0, 0, 0]))
    )
    region(vm, 0, 0, 100 * KB4, U, flags=LOG)
    access(vm, 0, 100 * KB4, "write")
    num = 128 - first
    e = kit.rejected(
        vm,
        "clear_dirty_log",
        dict(slot=0, first_page=first, num_pages=num, bitmap=bitmap(num, list(range(num)))),
    )
    assert e.errno == errno.EINVAL
    assert get_log(vm)["dirty_count"] == 100


@pytest.mark.parametrize("slot", [1, 7])
def test_clear_dirty_log_on_a_slot_without_logging_is_enoent(slot: int) -> None:
    vm = huge_vm(MANUAL)
    region(vm, 1, 64 * MB, 4 * MB, U + 64 * MB)  # slot 1 exists, no logging; slot 7 absent
    with pytest.raises(KvmError) as e:
        clear_log(vm, 0, 64, bitmap(64, [0]), slot=slot)
    assert e.value.errno == errno.ENOENT


def test_clear_dirty_log_checks_alignment_before_the_slot() -> None:
    """kvm_clear_dirty_log_protect: slot id range, then first_page & 63 (EINVAL), then the slot
    lookup (ENOENT) — an unaligned first_page on a non-logging slot is EINVAL."""
    vm = huge_vm(MANUAL)
    with pytest.raises(KvmError) as e:
        clear_log(vm, 1, 64, bitmap(64, [0]), slot=7)
    assert e.value.errno == errno.EINVAL


# -- regression cases from the engine review --------------------------------------------------
def test_logging_off_on_readonly_slot_frees_the_bitmap() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.MB, kit.HVA, kit.READONLY | kit.LOG_DIRTY)
    assert vm.memslot(0)["dirty_logging"] is True
    assert vm.apply(parse("get_dirty_log", dict(slot=0)))["num_pages"] == 256
    kit.region(vm, 0, 0, kit.MB, kit.HVA, kit.READONLY)  # FLAGS_ONLY: logging off
    assert vm.memslot(0)["dirty_logging"] is False
    assert kit.rejected(vm, "get_dirty_log", dict(slot=0)).errno == errno.ENOENT


def test_clear_dirty_log_splits_only_huge_pages_under_set_bits() -> None:
    vm = Vm.create(kit.DEFAULT)
    vm.apply(
        parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[3]))
    )  # MANUAL_PROTECT | INIT_SET
    kit.hugepage(vm, kit.HVA, 4 * kit.M2)
    kit.region(vm, 0, 0, 4 * kit.M2, kit.HVA)
    kit.access(vm, 0, 4 * kit.M2)  # 4 x 2M leaves
    kit.region(vm, 0, 0, 4 * kit.M2, kit.HVA, kit.LOG_DIRTY)  # bitmap all ones, nothing split yet
    assert vm.stats()["pages_2m"] == 4
    bm = bytearray(2048 // 8)
    bm[0] = 1  # clear only page 0
    out = vm.apply(
        parse(
            "clear_dirty_log",
            dict(slot=0, first_page=0, num_pages=2048, bitmap=base64.b64encode(bm).decode()),
        ),
    )
    assert out == {"cleared": 1, "sptes_write_protected": 1}
    s = vm.stats()
    assert (s["pages_2m"], s["pages_4k"]) == (3, 512)
    assert vm.translate(0)["roots"][0]["leaf"]["level"] == 1
    assert vm.translate(kit.M2)["roots"][0]["leaf"]["level"] == 2


def test_no_false_no_huge_while_logging_after_manual_protect_cap_change() -> None:
    vm = Vm.create(kit.DEFAULT)
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[3])))
    kit.hugepage(vm, kit.HVA, kit.M2)
    kit.region(vm, 0, 0, kit.M2, kit.HVA)
    kit.access(vm, 0)  # one 2M leaf
    kit.region(vm, 0, 0, kit.M2, kit.HVA, kit.LOG_DIRTY)  # INITIALLY_SET: the huge leaf stays
    assert vm.stats()["pages_2m"] == 1
    vm.apply(parse("enable_cap", dict(cap=kit.MANUAL_PROTECT_CAP, args=[1])))  # legal at any time
    audit = vm.audit()
    assert audit["violations"] == []
    assert audit["ok"] is True
