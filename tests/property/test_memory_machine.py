"""Random guest/host/memslot sequences against a reference model of memory contents.

The reference asks the engine nothing. It is a flat dict {host page: bytes}, the memslot
layout (id -> gpa, npages, hva, flags), the host's page sizes (2 MiB regions under THP or
hugetlbfs, discarded pages) and a dict {GFN: leaf level} of what the guest has mapped, with
the 2 MiB blocks that hold a 4 KiB table. Leaf levels follow kvm_mmu_max_mapping_level (§2.4:
no huge leaf in a dirty-logged slot, or where the 2 MiB block leaves the slot or its GFN and
HVA are not congruent, or where the host page is not huge); a fault on a block that already
holds a 4 KiB table replaces it with a huge leaf, except a prefetch
(tdp_mmu_map_handle_target_level); enabling dirty logging splits huge leaves
(kvm_mmu_slot_try_split_huge_pages), disabling it collapses tables whose host pages are
whole again (kvm_tdp_mmu_recover_huge_pages).

Every guest load must return what the model says (or an MMIO exit exactly when no slot
covers the GPA), every store/access must exit exactly where it says, every zap must remove
exactly the leaves the model says, by level, and the engine's leaf counts must equal the
model's after every step, with `vm.audit()` clean. Zap paths are checked against
kvm-memslots.md §4.1 (zap all only for a DEFAULT VM with SLOT_ZAP_ALL enabled), and the dirty
log against what the guest wrote (no written page may be missing, §3.4/§5.3).

Two rules build sequences random steps reach too rarely, on a new one-block slot over a THP
region: an MMIO SPTE's table under a slot that may map huge, then a fault (replaces the table)
or a pre-fault (leaves it); and a partial discard under dirty logging (the THP splits, the
freed pages block recovery even when the region is advised huge again).
"""

from __future__ import annotations

import base64
import errno
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.engine import KvmError, Vm
from app.engine.ops import parse

PAGE = 4096
MB = 1 << 20
U = 0x7F00_0000_0000  # host region [U, U + 24 MiB)
HOST_MB = 24
GPA_MB = 32  # slots live in [0, 32 MiB) of guest physical space
LOG, RO = 1, 2
QUIRK_SLOT_ZAP_ALL = 0x80
MAX_GFN = (1 << 40) - 1
IDS = [0, 1, 2, 3]
ZERO = bytes(PAGE)


@dataclass
class SlotM:
    gpa: int
    npages: int
    hva: int
    flags: int
    # Dirty-log reference (only while LOG is set): page indexes the guest wrote, and every
    # page it touched at all, since logging started or the last harvest.
    written: set[int] = field(default_factory=set)
    touched: set[int] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.gpa + self.npages * PAGE

    def covers(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.end

    def overlaps(self, gpa: int, npages: int) -> bool:
        return gpa < self.end and self.gpa < gpa + npages * PAGE

    @property
    def gfn(self) -> int:
        return self.gpa // PAGE

    @property
    def gfn_end(self) -> int:
        return self.gfn + self.npages

    def hpage(self, gfn: int) -> int:
        """Host page number (hva >> 12) behind `gfn`."""
        return self.hva // PAGE + gfn - self.gfn


# Mostly 2 MiB aligned GPAs and HVAs (so THP/hugetlb can give huge leaves), sometimes not.
slot_gpas = st.one_of(
    st.integers(0, GPA_MB // 2 - 3).map(lambda n: n * 2 * MB),
    st.integers(0, GPA_MB // 2 - 3).map(lambda n: n * 2 * MB),
    st.builds(
        lambda mb, extra: mb * MB + extra * PAGE,
        st.integers(0, GPA_MB - 5),
        st.sampled_from([0, 1, 256]),
    ),
)
slot_pages = st.sampled_from([1, 16, 256, 512, 512, 768, 1024, 1024])
slot_hvas = st.one_of(
    st.integers(0, HOST_MB // 2 - 3).map(lambda n: U + n * 2 * MB),
    st.integers(0, HOST_MB // 2 - 3).map(lambda n: U + n * 2 * MB),
    st.builds(
        lambda mb, extra: U + mb * MB + extra * PAGE,
        st.integers(0, HOST_MB - 5),
        st.sampled_from([0, 1]),
    ),
)
slot_flags = st.sampled_from([0, 0, 0, LOG, RO, RO | LOG])
kinds = st.sampled_from(["read", "write", "exec"])


class MemoryMachine(RuleBasedStateMachine):
    # ------------------------------------------------------------------ setup / model
    @initialize(
        vm_type=st.sampled_from([0, 1]),
        quirk_disabled=st.booleans(),
        thp=st.sampled_from([True, True, False]),
        data=st.data(),
    )
    def setup(self, vm_type: int, quirk_disabled: bool, thp: bool, data: st.DataObject) -> None:
        self.vm = Vm.create(vm_type, 2)
        self.vm_type = vm_type
        self.quirk = True
        self.slots: dict[int, SlotM] = {}
        self.mem: dict[int, bytes] = {}  # host page number -> contents (absent = zeroes)
        # Host page sizes by 2 MiB region (hva >> 21): "thp" (MADV_HUGEPAGE) or "hugetlb";
        # absent = 4 KiB pages.
        self.huge: dict[int, str] = {}
        self.freed: set[int] = set()  # host pages discarded and not touched since
        self.populated: set[int] = set()  # host pages possibly backed by a populated THP
        # What the guest has mapped: GFN -> leaf level (1, or 2 keyed by the block's first
        # GFN), and the 2 MiB blocks (gfn >> 9) holding a 4 KiB page table.
        self.leaves: dict[int, int] = {}
        self.tables: set[int] = set()
        if quirk_disabled:
            self.disable_quirk()
        if thp:
            self.host_advise(0, HOST_MB // 2, "hugepage")
        # Start with a few slots so that every sequence has memory to work on.
        for id in IDS[: data.draw(st.integers(1, 3), label="initial_slots")]:
            self.create_slot(
                id,
                data.draw(slot_gpas),
                data.draw(slot_pages),
                data.draw(slot_hvas),
                data.draw(slot_flags),
            )
        # ... and with memory mapped, so that the first zap has something to zap.
        for id, slot in sorted(self.slots.items()):
            self.do_access(slot.gpa, slot.npages, data.draw(kinds), id % 2)

    def slot_at(self, gpa: int) -> SlotM | None:
        for s in self.slots.values():
            if s.covers(gpa):
                return s
        return None

    def host_bytes(self, hva: int, n: int) -> bytes:
        out = bytearray()
        while n:
            page, off = divmod(hva, PAGE)
            k = min(n, PAGE - off)
            out += self.mem.get(page, ZERO)[off : off + k]
            hva += k
            n -= k
        return bytes(out)

    def host_store(self, hva: int, data: bytes) -> None:
        while data:
            page, off = divmod(hva, PAGE)
            k = min(len(data), PAGE - off)
            buf = bytearray(self.mem.get(page, ZERO))
            buf[off : off + k] = data[:k]
            self.mem[page] = bytes(buf)
            hva += k
            data = data[k:]

    def host_drop(self, hva: int, n: int) -> None:
        for page in range(hva // PAGE, (hva + n + PAGE - 1) // PAGE):
            self.mem.pop(page, None)

    def zap_all_expected(self) -> bool:
        return self.vm_type == 0 and self.quirk

    # ------------------------------------------------------------------ host page sizes
    def host_huge(self, hpage: int) -> bool:
        return (hpage >> 9) in self.huge

    def host_touch(self, first: int, end: int) -> None:
        """Host pages faulted in or written: no longer freed; a huge page is populated whole."""
        if self.host_huge(first):
            first &= ~511
        if self.host_huge(end - 1):
            end = -(-end // 512) * 512
        self.freed.difference_update(range(first, end))
        self.populated.update(range(first & ~511, -(-end // 512) * 512))

    def host_free(self, first: int, end: int) -> None:
        """MADV_DONTNEED of host pages [first, end): contents gone, pages freed; a THP cut in
        part is split (split_huge_pmd)."""
        self.host_drop(first * PAGE, (end - first) * PAGE)
        self.freed.update(range(first, end))
        self.populated.difference_update(range(first, end))
        for edge in (first, end):
            if edge & 511 and self.huge.get(edge >> 9) == "thp":
                del self.huge[edge >> 9]

    # ------------------------------------------------------------------ mappings
    def huge_ok(self, s: SlotM, gfn: int) -> bool:
        """kvm_mmu_max_mapping_level: may `gfn` of slot `s` be mapped by a 2 MiB leaf?"""
        block = gfn & ~511
        return (
            not s.flags & LOG
            and s.gfn <= block
            and block + 512 <= s.gfn_end
            and (s.gfn - s.hva // PAGE) % 512 == 0
            and self.host_huge(s.hpage(gfn))
        )

    def map_run(self, s: SlotM, gfn: int, stop: int, prefetch: bool) -> None:
        """Fault GFNs [gfn, stop) of one slot and one 2 MiB block."""
        block = gfn & ~511
        if self.leaves.get(block) == 2:
            return  # a huge leaf maps the block already
        if self.huge_ok(s, gfn):
            if all(self.leaves.get(g) == 1 for g in range(gfn, stop)):
                return  # 4 KiB leaves mapped before a huge page was possible
            if prefetch and block >> 9 in self.tables:
                return  # a prefetch never replaces a present SPTE
            for g in range(block, block + 512):
                self.leaves.pop(g, None)
            self.tables.discard(block >> 9)
            self.leaves[block] = 2
            self.host_touch(s.hpage(block), s.hpage(block) + 512)
            return
        self.tables.add(block >> 9)
        new = [g for g in range(gfn, stop) if g not in self.leaves]
        if new:
            self.leaves.update((g, 1) for g in new)
            self.host_touch(s.hpage(gfn), s.hpage(stop))

    def fault(self, gpa: int, npages: int, write: bool, prefetch: bool = False) -> None:
        """What an access of `npages` pages from `gpa` maps, up to its first exit."""
        ex = self.expected_exit(gpa, npages, write)
        gfn = gpa // PAGE
        end = gfn + (npages if ex is None else ex[0])
        while gfn < end:
            s = self.slot_at(gfn * PAGE)
            assert s is not None
            stop = min(end, s.gfn_end, (gfn | 511) + 1)
            self.map_run(s, gfn, stop, prefetch)
            gfn = stop
        if ex is not None and self.slot_at(ex[1]) is None:
            self.tables.add(ex[1] // PAGE >> 9)  # the MMIO SPTE's table (install_mmio_spte)

    def zap_leaves(self, lo: int, hi: int) -> tuple[int, int]:
        """Drop every leaf that maps a GFN of [lo, hi): (4 KiB, 2 MiB) leaves dropped."""
        gone = [g for g, lv in self.leaves.items() if g < hi and lo < g + (512 if lv == 2 else 1)]
        n2 = sum(1 for g in gone if self.leaves[g] == 2)
        for g in gone:
            del self.leaves[g]
        return len(gone) - n2, n2

    def zap_everything(self) -> tuple[int, int]:
        """kvm_mmu_zap_all_fast: the roots go, with every table and leaf."""
        n2 = sum(1 for lv in self.leaves.values() if lv == 2)
        n4 = len(self.leaves) - n2
        self.leaves.clear()
        self.tables.clear()
        return n4, n2

    def notifier(self, first: int, end: int) -> tuple[bool, int, int]:
        """kvm_mmu_notifier_invalidate_range_start over host pages [first, end): whether some
        slot maps them, and the (4 KiB, 2 MiB) leaves dropped."""
        hit, n4, n2 = False, 0, 0
        for s in self.slots.values():
            h0 = s.hva // PAGE
            lo, hi = max(first, h0), min(end, h0 + s.npages)
            if lo < hi:
                hit = True
                a, b = self.zap_leaves(s.gfn + lo - h0, s.gfn + hi - h0)
                n4, n2 = n4 + a, n2 + b
        return hit, n4, n2

    def check_notifier(self, z: dict | None, first: int, end: int) -> None:
        hit, n4, n2 = self.notifier(first, end)
        if not hit:
            assert z is None, z
            return
        assert z is not None and z["cause"] == "mmu_notifier" and z["path"] == "zap_gfn_range"
        self.check_counts(z, n4, n2)
        assert z["tlb_flushes"] == (1 if n4 + n2 else 0)

    @staticmethod
    def check_counts(z: dict, n4: int, n2: int) -> None:
        lv = z["sptes_zapped"]
        assert (lv["4k"], lv["2m"], lv["1g"]) == (n4, n2, 0), (z, n4, n2)
        assert z["sptes_zapped_total"] == n4 + n2

    def region(self, id: int, gpa: int, npages: int, hva: int, flags: int) -> dict:
        return self.vm.apply(
            parse(
                "set_user_memory_region",
                dict(
                    slot=id,
                    flags=flags,
                    guest_phys_addr=gpa,
                    memory_size=npages * PAGE,
                    userspace_addr=hva,
                ),
            ),
        )

    def pick_gpa(self, data: st.DataObject, span: int = PAGE) -> int:
        """Mostly a page inside some slot (or just past its end), sometimes anywhere."""
        if self.slots and data.draw(st.integers(0, 9), label="in_slot") < 8:
            s = data.draw(st.sampled_from(sorted(self.slots.items())), label="slot")[1]
            page = data.draw(st.integers(0, s.npages), label="page")
            return s.gpa + page * PAGE
        return data.draw(st.integers(0, GPA_MB * MB // PAGE - 1), label="gpa_page") * PAGE

    def touch(self, gpa: int, npages: int, write: bool) -> None:
        for p in range(npages):
            s = self.slot_at(gpa + p * PAGE)
            if s is not None and s.flags & LOG:
                i = (gpa + p * PAGE - s.gpa) // PAGE
                s.touched.add(i)
                if write:
                    s.written.add(i)

    def expected_exit(self, gpa: int, npages: int, write: bool) -> tuple[int, int] | None:
        """(page index, gpa) of the first page that exits, or None."""
        for p in range(npages):
            s = self.slot_at(gpa + p * PAGE)
            if s is None or (write and s.flags & RO):
                return p, gpa + p * PAGE
        return None

    # ------------------------------------------------------------------ memslots
    @rule(
        id=st.sampled_from(IDS), gpa=slot_gpas, npages=slot_pages, hva=slot_hvas, flags=slot_flags
    )
    def create_slot(self, id: int, gpa: int, npages: int, hva: int, flags: int) -> None:
        if id in self.slots:
            return
        clash = any(s.overlaps(gpa, npages) for s in self.slots.values())
        try:
            r = self.region(id, gpa, npages, hva, flags)
        except KvmError as e:
            assert clash and e.errno == errno.EEXIST, e
            return
        assert not clash
        assert r["change"] == "create" and r["zap"] is None
        self.slots[id] = SlotM(gpa, npages, hva, flags)

    def check_slot_zap(self, z: dict, cause: str, s: SlotM) -> None:
        """kvm_arch_flush_shadow_memslot (kvm-memslots.md §4.1): every root goes for a DEFAULT
        VM with SLOT_ZAP_ALL, else only the slot's leaves, one flush if any was mapped."""
        assert z["cause"] == cause
        if self.zap_all_expected():
            assert z["path"] == "zap_all_fast"
            assert z["tlb_flushes"] == 0
            self.zap_everything()
        else:
            n4, n2 = self.zap_leaves(s.gfn, s.gfn_end)
            assert z["path"] == "zap_slot_leafs"
            self.check_counts(z, n4, n2)
            assert z["tlb_flushes"] == (1 if n4 + n2 else 0)
            assert z["tables_freed"] == 0

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def delete_slot(self, data: st.DataObject) -> None:
        id = data.draw(st.sampled_from(sorted(self.slots)), label="id")
        r = self.region(id, 0, 0, 0, 0)
        assert r["change"] == "delete" and r["memslot"] is None
        self.check_slot_zap(r["zap"], "memslot_delete", self.slots[id])
        del self.slots[id]

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), gpa=slot_gpas)
    def move_slot(self, data: st.DataObject, gpa: int) -> None:
        id = data.draw(st.sampled_from(sorted(self.slots)), label="id")
        s = self.slots[id]
        if gpa == s.gpa:
            return
        clash = any(o.overlaps(gpa, s.npages) for k, o in self.slots.items() if k != id)
        try:
            r = self.region(id, gpa, s.npages, s.hva, s.flags)
        except KvmError as e:
            assert clash and e.errno == errno.EEXIST, e
            return
        assert not clash
        assert r["change"] == "move"
        self.check_slot_zap(r["zap"], "memslot_move", s)
        s.gpa = gpa  # the dirty bitmap (page indexes) moves with the slot

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def move_beyond_max_gfn(self, data: st.DataObject) -> None:
        """§2.1 V21: the late max-gfn check fails after the zap; the old slot stays."""
        id = data.draw(st.sampled_from(sorted(self.slots)), label="id")
        s = self.slots[id]
        gpa = (MAX_GFN + 1 - s.npages // 2) * PAGE if s.npages > 1 else (MAX_GFN + 1) * PAGE
        try:
            self.region(id, gpa, s.npages, s.hva, s.flags)
        except KvmError as e:
            assert e.errno == errno.EINVAL
            assert getattr(e, "state_changed", False) is True
        else:
            raise AssertionError("a MOVE beyond the max gfn succeeded")
        self.check_slot_zap(self.vm.zap_events()[0], "memslot_move", s)
        assert self.vm.memslot(id)["guest_phys_addr"] == s.gpa

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def toggle_logging(self, data: st.DataObject) -> None:
        self.do_toggle_logging(data.draw(st.sampled_from(sorted(self.slots)), label="id"))

    def do_toggle_logging(self, id: int) -> None:
        s = self.slots[id]
        r = self.region(id, s.gpa, s.npages, s.hva, s.flags ^ LOG)
        assert r["change"] == "flags_only"
        s.flags ^= LOG
        s.written, s.touched = set(), set()
        if s.flags & RO:
            # kvm_mmu_slot_apply_flags: nothing to split or recover in a read-only slot.
            assert r["zap"] is None, r
            return
        huge = [g for g, lv in self.leaves.items() if lv == 2 and s.gfn <= g < s.gfn_end]
        if s.flags & LOG:
            # kvm_mmu_slot_try_split_huge_pages: each huge leaf becomes a table of 4K leaves.
            for g in huge:
                self.leaves.update((x, 1) for x in range(g, g + 512))
                self.tables.add(g >> 9)
            assert r["zap"]["huge_pages_split"] == len(huge), r
            return
        # kvm_tdp_mmu_recover_huge_pages: a table of the slot with a leaf in it collapses
        # where a huge leaf is possible again and the host pages are whole (none freed).
        blocks = sorted(
            {g >> 9 for g, lv in self.leaves.items() if lv == 1 and s.gfn <= g < s.gfn_end}
        )
        recovered = 0
        for b in blocks:
            first = s.hpage(b << 9)
            if not self.huge_ok(s, b << 9) or self.freed.intersection(range(first, first + 512)):
                continue
            for g in range(b << 9, (b + 1) << 9):
                self.leaves.pop(g, None)
            self.leaves[b << 9] = 2
            self.tables.discard(b)
            recovered += 1
        assert r["zap"]["huge_pages_recovered"] == recovered, r

    @precondition(lambda self: self.quirk)
    @rule()
    def disable_quirk(self) -> None:
        self.vm.apply(
            parse(
                "enable_cap",
                dict(cap="KVM_CAP_DISABLE_QUIRKS2", args=[QUIRK_SLOT_ZAP_ALL, 0, 0, 0]),
            )
        )
        self.quirk = False

    # ------------------------------------------------------------------ guest
    def do_access(self, gpa: int, npages: int, kind: str, vcpu: int) -> None:
        write = kind == "write"
        r = self.vm.apply(
            parse("access", dict(vcpu=vcpu, gpa=gpa, size=npages * PAGE, access=kind))
        )
        self.fault(gpa, npages, write)
        ex = self.expected_exit(gpa, npages, write)
        if ex is None:
            assert r["exit"] is None, r
            self.touch(gpa, npages, write)
        else:
            assert r["exit"] is not None, (r, ex)
            if kind == "exec":
                # No memslot: the emulator cannot fetch the instruction (CPL 0: internal error).
                assert r["exit"]["reason"] == "KVM_EXIT_INTERNAL_ERROR", r
            else:
                assert r["exit"]["reason"] == "KVM_EXIT_MMIO"
                assert (r["exit"]["gpa"], r["exit"]["is_write"]) == (ex[1], write)
            self.touch(gpa, ex[0], write)

    @rule(
        data=st.data(),
        npages=st.sampled_from([1, 3, 64, 512, 1024]),
        kind=kinds,
        vcpu=st.sampled_from([0, 1]),
    )
    def access(self, data: st.DataObject, npages: int, kind: str, vcpu: int) -> None:
        self.do_access(self.pick_gpa(data), npages, kind, vcpu)

    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=64), vcpu=st.sampled_from([0, 1]))
    def store(self, data: st.DataObject, payload: bytes, vcpu: int) -> None:
        gpa = self.pick_gpa(data) + data.draw(st.integers(0, PAGE - len(payload)), label="off")
        r = self.vm.apply(parse("store", dict(vcpu=vcpu, gpa=gpa, data=payload.hex())))
        self.fault(gpa & ~(PAGE - 1), 1, True)
        s = self.slot_at(gpa)
        if s is None or s.flags & RO:
            assert r == {
                "exit": {
                    "reason": "KVM_EXIT_MMIO",
                    "gpa": gpa,
                    "len": min(len(payload), 8),
                    "is_write": True,
                }
            }, r
            return
        assert r == {}, r
        hva = s.hva + (gpa - s.gpa)
        self.host_store(hva, payload)
        self.host_touch(hva // PAGE, -(-(hva + len(payload)) // PAGE))
        self.touch(gpa & ~(PAGE - 1), 1, True)

    @rule(data=st.data(), n=st.integers(1, 64), vcpu=st.sampled_from([0, 1]))
    def load(self, data: st.DataObject, n: int, vcpu: int) -> None:
        gpa = self.pick_gpa(data) + data.draw(st.integers(0, PAGE - n), label="off")
        r = self.vm.apply(parse("load", dict(vcpu=vcpu, gpa=gpa, len=n)))
        self.fault(gpa & ~(PAGE - 1), 1, False)
        s = self.slot_at(gpa)
        if s is None:
            assert r == {
                "exit": {"reason": "KVM_EXIT_MMIO", "gpa": gpa, "len": min(n, 8), "is_write": False}
            }, r
            return
        assert r == {"data": self.host_bytes(s.hva + (gpa - s.gpa), n).hex()}, (r, gpa)
        self.touch(gpa & ~(PAGE - 1), 1, False)

    @rule(data=st.data(), npages=st.sampled_from([1, 16, 600]))
    def pre_fault(self, data: st.DataObject, npages: int) -> None:
        self.do_pre_fault(self.pick_gpa(data), npages)

    def do_pre_fault(self, gpa: int, npages: int) -> None:
        end = gpa + npages * PAGE
        covered = gpa
        while covered < end and self.slot_at(covered) is not None:
            covered += PAGE
        self.fault(gpa, npages, False, prefetch=True)
        try:
            r = self.vm.apply(parse("pre_fault", dict(vcpu=0, gpa=gpa, size=npages * PAGE)))
        except KvmError as e:
            assert covered == gpa and e.errno == errno.ENOENT, e
            return
        assert covered > gpa
        assert r == {"gpa": covered, "size": end - covered}, (r, covered)
        self.touch(gpa, (covered - gpa) // PAGE, False)

    @precondition(lambda self: any(s.flags & LOG for s in self.slots.values()))
    @rule(data=st.data())
    def get_dirty_log(self, data: st.DataObject) -> None:
        ids = sorted(k for k, s in self.slots.items() if s.flags & LOG)
        id = data.draw(st.sampled_from(ids), label="id")
        s = self.slots[id]
        log = self.vm.apply(parse("get_dirty_log", dict(slot=id)))
        raw = base64.b64decode(log["bitmap"])
        bits = {i for i in range(s.npages) if raw[i // 8] >> (i % 8) & 1}
        assert log["dirty_count"] == len(bits)
        assert s.written <= bits, (
            "written pages missing from the dirty log",
            sorted(s.written - bits),
        )
        assert bits <= s.touched, ("untouched pages reported dirty", sorted(bits - s.touched))
        s.written, s.touched = set(), set()

    # ------------------------------------------------------------------ host
    @rule(
        hpage=st.integers(0, HOST_MB * MB // PAGE - 1),
        off=st.integers(0, PAGE - 1),
        payload=st.binary(min_size=1, max_size=96),
    )
    def host_write(self, hpage: int, off: int, payload: bytes) -> None:
        hva = U + hpage * PAGE + off
        self.vm.apply(parse("host_write", dict(userspace_addr=hva, data=payload.hex())))
        self.host_store(hva, payload)
        self.host_touch(hva // PAGE, -(-(hva + len(payload)) // PAGE))

    @rule(hpage=st.integers(0, HOST_MB * MB // PAGE - 1), npages=st.sampled_from([1, 2, 17, 512]))
    def host_discard(self, hpage: int, npages: int) -> None:
        hva, end = U + hpage * PAGE, U + (hpage + npages) * PAGE
        # hugetlbfs pages are discarded whole: widen the range over any it touches.
        if any(self.huge.get(r) == "hugetlb" for r in range(hva >> 21, ((end - 1) >> 21) + 1)):
            hva, end = hva & ~(2 * MB - 1), -(-end // (2 * MB)) * 2 * MB
        r = self.vm.apply(parse("host_discard", dict(userspace_addr=hva, len=end - hva)))
        self.check_notifier(r["zap"], hva // PAGE, end // PAGE)
        self.host_free(hva // PAGE, end // PAGE)

    @rule(
        mb2=st.integers(0, HOST_MB // 2 - 2),
        n2=st.sampled_from([1, 2]),
        advice=st.sampled_from(["hugepage", "hugepage", "nohugepage"]),
    )
    def host_advise(self, mb2: int, n2: int, advice: str) -> None:
        regions = range((U >> 21) + mb2, (U >> 21) + mb2 + n2)
        if advice == "nohugepage" and any(
            self.huge.get(r) == "thp" and self.populated.intersection(range(r << 9, (r + 1) << 9))
            for r in regions
        ):
            return  # whether a populated THP stays is up to the host's allocator: not modelled
        r = self.vm.apply(
            parse(
                "host_advise", dict(userspace_addr=U + mb2 * 2 * MB, len=n2 * 2 * MB, advice=advice)
            )
        )
        assert r == {}
        for region in regions:
            if self.huge.get(region) == "hugetlb":
                continue  # hugetlbfs ignores THP advice
            if advice == "hugepage":
                self.huge[region] = "thp"
            else:
                self.huge.pop(region, None)

    @rule(mb2=st.integers(0, HOST_MB // 2 - 2), n2=st.sampled_from([1, 2]))
    def host_map_hugetlb(self, mb2: int, n2: int) -> None:
        hva, n = U + mb2 * 2 * MB, n2 * 2 * MB
        r = self.vm.apply(parse("host_map", dict(userspace_addr=hva, len=n, page_size=2 * MB)))
        # The old mapping goes (notifier), the new one has fresh, zeroed pages.
        self.check_notifier(r["zap"], hva // PAGE, (hva + n) // PAGE)
        self.host_free(hva // PAGE, (hva + n) // PAGE)
        self.huge.update((region, "hugetlb") for region in range(hva >> 21, (hva + n) >> 21))

    # ------------------------------------------------------------------ targeted sequences
    # Paths a random sequence reaches too rarely, each built on a new slot of one 2 MiB block
    # at a free GPA, backed by a THP region (so that a huge leaf is possible there).
    def free_blocks(self) -> list[int]:
        """GPAs of the 2 MiB blocks no slot overlaps."""
        return [
            b * 2 * MB
            for b in range(GPA_MB // 2)
            if not any(o.overlaps(b * 2 * MB, 512) for o in self.slots.values())
        ]

    def new_block(self, data: st.DataObject, gpa: int, flags: int) -> tuple[SlotM, int] | None:
        """A new 512-page slot at `gpa` on a THP region: (its model, the region's index)."""
        free_ids = [i for i in IDS if i not in self.slots]
        regions = [m for m in range(HOST_MB // 2 - 1) if self.huge.get((U >> 21) + m) != "hugetlb"]
        if not free_ids or not regions:
            return None
        id = data.draw(st.sampled_from(free_ids), label="new_id")
        mb2 = data.draw(st.sampled_from(regions), label="region")
        self.host_advise(mb2, 1, "hugepage")
        if self.huge.get((U >> 21) + mb2) != "thp":
            return None  # a populated THP region advised nohugepage earlier (not modelled)
        self.create_slot(id, gpa, 512, U + mb2 * 2 * MB, flags)
        return self.slots[id], mb2

    @precondition(lambda self: len(self.slots) < len(IDS))
    @rule(data=st.data(), prefetch=st.booleans())
    def fault_over_an_mmio_table(self, data: st.DataObject, prefetch: bool) -> None:
        """A GPA without a slot caches an MMIO SPTE in a 4 KiB table (install_mmio_spte); a
        slot created over that 2 MiB block may map it huge, but the table is in the way: a
        fault replaces it with a huge leaf, a pre-fault leaves it (tdp_mmu_map_handle_target_
        level returns RET_PF_SPURIOUS for a prefetch over a present SPTE), mapping nothing."""
        free = self.free_blocks()
        if not free:
            return
        gpa = data.draw(st.sampled_from(free), label="mmio_block")
        self.do_access(gpa + data.draw(st.integers(0, 511), label="mmio_page") * PAGE, 1, "read", 0)
        assert gpa // PAGE >> 9 in self.tables
        made = self.new_block(data, gpa, 0)
        if made is None:
            return
        s = made[0]
        if prefetch:
            self.do_pre_fault(gpa, 512)
            assert not any(s.gfn <= g < s.gfn_end for g in self.leaves)
        else:
            self.do_access(gpa, 1, "read", 0)
            assert self.leaves.get(s.gfn) == 2

    @precondition(lambda self: len(self.slots) < len(IDS))
    @rule(
        data=st.data(),
        first=st.integers(1, 400),
        npages=st.sampled_from([1, 2, 17]),
        readvise=st.booleans(),
    )
    def discard_under_logging_then_stop(
        self, data: st.DataObject, first: int, npages: int, readvise: bool
    ) -> None:
        """Dirty logging maps a THP-backed block at 4 KiB; discarding part of it splits the
        THP (split_huge_pmd) and frees those host pages. Stopping logging recovers nothing
        there: the host no longer maps it huge, or, advised hugepage again, the freed pages
        are still PTE-mapped (kvm_tdp_mmu_recover_huge_pages asks the host's mapping level).
        A fault on a discarded page afterwards maps 4 KiB unless the region is huge again."""
        free = self.free_blocks()
        if not free:
            return
        made = self.new_block(data, data.draw(st.sampled_from(free), label="block"), LOG)
        if made is None:
            return
        s, mb2 = made
        id = next(k for k, v in self.slots.items() if v is s)
        self.do_access(s.gpa, 512, "write", 0)
        assert all(self.leaves.get(g) == 1 for g in range(s.gfn, s.gfn_end))
        self.host_discard(s.hva // PAGE - U // PAGE + first, npages)
        assert (U >> 21) + mb2 not in self.huge  # split: a part of it was discarded
        if readvise:
            self.host_advise(mb2, 1, "hugepage")
        self.do_toggle_logging(id)
        assert not any(self.leaves.get(g) == 2 for g in range(s.gfn, s.gfn_end))
        self.do_access(s.gpa + first * PAGE, npages, "read", 0)

    # ------------------------------------------------------------------ zaps
    @rule(data=st.data(), npages=st.sampled_from([1, 7, 512, 1024]))
    def zap_range(self, data: st.DataObject, npages: int) -> None:
        gpa = self.pick_gpa(data)
        z = self.vm.apply(parse("zap", dict(scope="range", gpa=gpa, size=npages * PAGE)))
        assert z["path"] == "zap_gfn_range"
        n4, n2 = self.zap_leaves(gpa // PAGE, gpa // PAGE + npages)
        self.check_counts(z, n4, n2)

    @rule()
    def zap_all(self) -> None:
        z = self.vm.apply(parse("zap", dict(scope="all", roots="shared")))
        assert z["path"] == "zap_all_fast"
        self.zap_everything()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def audit_clean(self) -> None:
        a = self.vm.audit()
        assert a["ok"], a["violations"]

    @invariant()
    def leaves_match(self) -> None:
        """The engine's leaf counts, VM-wide and per slot, are the model's."""
        n2 = sum(1 for lv in self.leaves.values() if lv == 2)
        want = {"4k": len(self.leaves) - n2, "2m": n2, "1g": 0}
        s = self.vm.stats()
        assert {"4k": s["pages_4k"], "2m": s["pages_2m"], "1g": s["pages_1g"]} == want
        assert self.vm.audit()["checked"]["leaves"] == want
        for id, slot in self.slots.items():
            pages = sum(
                512 if lv == 2 else 1
                for g, lv in self.leaves.items()
                if slot.gfn <= g < slot.gfn_end
            )
            assert self.vm.memslot(id)["mapped"]["total"] == pages, id

    @invariant()
    def layout_matches(self) -> None:
        got = {
            m["slot"]: (m["guest_phys_addr"], m["npages"], m["userspace_addr"], m["flags"])
            for m in self.vm.memslots()
        }
        want = {k: (s.gpa, s.npages, s.hva, s.flags) for k, s in self.slots.items()}
        assert got == want


MemoryMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryMachine = MemoryMachine.TestCase
