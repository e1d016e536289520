"""The bulk page-table path (whole leaf tables a level-2 table at a time) against the
general one (a table at a time, `Mmu.bulk = False`) on random workloads (issue 12).

Both VMs get the same calls; after each, the answers (zap durations aside: wall clock), the
trace ring, the audit and `codec.digest` (tables, stats, zap events, dirty bitmaps, TDX
state) must be identical. Workloads mix faults of several MiB (crossing leaf-table, 1 GiB and
slot boundaries), pre-faults, memslot creates/moves/deletes, dirty logging, THP and hugetlbfs
host pages, explicit zaps, private attributes and guest_memfd (SW_PROTECTED) and TDX shared and
private memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine import KvmError, Vm, codec, uapi
from app.engine.faults import FaultPath
from app.engine.hostmem import HostMemory
from app.engine.ops import parse
from app.engine.roots import Mmu

DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROTECTED = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
LOG_DIRTY = int(uapi.KVM_MEM_LOG_DIRTY_PAGES)
GMEM = int(uapi.MemFlag.KVM_MEM_GUEST_MEMFD)
PRIVATE = int(uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
DISABLE_QUIRKS2 = int(uapi.Cap.KVM_CAP_DISABLE_QUIRKS2)
SLOT_ZAP_ALL = int(uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL)
PAGE = uapi.PAGE_SIZE
MB, GB = 1 << 20, 1 << 30
HVA = 1 << 40
S47 = 1 << 47  # a 4-level TD's shared bit
GMEM_SIZE = 64 * MB

# Slot GPAs: aligned, crossing a 1 GiB boundary, unaligned to a leaf table.
gpas = st.sampled_from([0, GB - 6 * MB, 3 * MB + 5 * PAGE, 2 * GB])
sizes = st.sampled_from([2 * MB, 6 * MB + 3 * PAGE, 12 * MB, 8 * PAGE])
hva_offsets = st.sampled_from([0, 4 * MB, 5 * PAGE])
spots = st.sampled_from([0, GB - 8 * MB, 3 * MB + 7 * PAGE, 2 * GB + MB, GB])
lengths = st.sampled_from([PAGE, 2 * MB, 5 * MB + 2 * PAGE, 10 * MB, 16 * MB])


def region_call(sid: int, gpa: int, size: int, off: int, flags: int, tdx: bool) -> tuple:
    args: dict[str, Any] = {
        "slot": sid,
        "flags": flags | (GMEM if tdx else 0),
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": HVA + sid * GB + off,
    }
    if tdx or flags & GMEM:
        args.update(guest_memfd=3, guest_memfd_offset=0)
    return ("set_user_memory_region", args)


@st.composite
def calls(draw: st.DrawFn, vm_type: int, slots: dict[int, tuple[int, int, int, int]]) -> tuple:
    """One call; memslot changes are often moves or flag changes of the slots present."""
    tdx = vm_type == TDX
    kind = draw(
        st.sampled_from(
            ["region", "move", "flags", "flags", "delete", "access", "access", "access"]
            + ["pre_fault", "write", "write"]
            + ["zap", "dirty", "thp", "hugetlb", "quirk"]
            + (["private"] * 3 if vm_type != DEFAULT else [])
            + (["accept"] if tdx else [])
        )
    )
    sid = draw(st.integers(0, 2))
    gpa, size, length = draw(spots), draw(lengths), draw(sizes)
    old = slots.get(sid)
    if kind == "region" or (kind in ("move", "flags") and old is None):
        gmem = GMEM if vm_type == SW_PROTECTED and draw(st.booleans()) else 0
        flags = draw(st.sampled_from([0, LOG_DIRTY])) | gmem
        return region_call(sid, draw(gpas), length, draw(hva_offsets), flags, tdx)
    if kind == "move":
        assert old is not None
        return region_call(sid, draw(gpas), old[1], old[2], old[3], tdx)
    if kind == "flags":
        assert old is not None
        return region_call(sid, old[0], old[1], old[2], old[3] ^ LOG_DIRTY, tdx)
    if kind == "delete":
        return region_call(sid, 0, 0, 0, 0, tdx)
    if kind == "write":
        start = old[0] if old is not None else gpa
        return ("access", {"vcpu": 0, "gpa": start, "size": size, "access": "write"})
    if kind in ("access", "pre_fault", "accept"):
        if old is not None and draw(st.booleans()):
            gpa = old[0] + draw(st.sampled_from([0, 4 * MB, 7 * PAGE]))
        shared = S47 if tdx and draw(st.booleans()) else 0
        args: dict[str, Any] = {"vcpu": 0, "gpa": gpa | shared, "size": size}
        if kind == "access":
            args["access"] = draw(st.sampled_from(["read", "write", "exec"]))
        elif kind == "accept":
            args["gpa"] = gpa
        return (kind, args)
    if kind == "zap":
        return ("zap", {"scope": "range", "gpa": gpa, "size": size, "roots": "both"})
    if kind == "dirty":
        return ("get_dirty_log", {"slot": sid})
    if kind == "thp":
        advice = draw(st.sampled_from(["hugepage", "nohugepage"]))
        return ("host_advise", {"userspace_addr": HVA + sid * GB, "len": 8 * MB, "advice": advice})
    if kind == "hugetlb":
        return ("host_map", {"userspace_addr": HVA + sid * GB, "len": 8 * MB, "page_size": 2 * MB})
    if kind == "quirk":
        return ("enable_cap", {"cap": DISABLE_QUIRKS2, "flags": 0, "args": [SLOT_ZAP_ALL, 0, 0, 0]})
    attrs = draw(st.sampled_from([0, PRIVATE, PRIVATE]))
    start = old[0] if old is not None else gpa
    return ("set_memory_attributes", {"address": start, "size": size, "attributes": attrs})


def scrub(answer: Any) -> Any:
    """An answer without the wall-clock zap durations."""
    if isinstance(answer, dict):
        return {k: scrub(v) for k, v in answer.items() if k != "duration_us"}
    if isinstance(answer, list):
        return [scrub(v) for v in answer]
    return answer


def run(vm: Vm, name: str, args: dict[str, Any], at: float) -> Any:
    try:
        return scrub(vm.apply(parse(name, dict(args)), at=at))
    except KvmError as e:
        return ("error", e.errno, str(e))


def new_vm(vm_type: int, bulk: bool) -> Vm:
    vm = Vm.create(vm_type, 1)
    vm.mmu.bulk = bulk
    if vm_type != DEFAULT:
        assert vm.apply(parse("create_guest_memfd", {"size": GMEM_SIZE, "flags": 0}), at=0.0)
    return vm


def same_state(a: Vm, b: Vm) -> None:
    ra, rb = a.mmu.trace.records(), b.mmu.trace.records()
    assert ra.tobytes() == rb.tobytes()
    assert a.audit() == b.audit()
    assert a.audit()["ok"], a.audit()["violations"]
    assert a.stats() == b.stats()
    assert codec.digest(a) == codec.digest(b)


def both(seq: list[tuple[str, dict[str, Any]]], capacity: int | None) -> tuple[Vm, Any]:
    """`seq` on a default VM by the bulk path and on one by the general path, each with a
    trace ring of `capacity` records (None: the default): identical answers and state after
    every call. Returns the bulk VM and its last answer."""
    bulk, general = new_vm(DEFAULT, True), new_vm(DEFAULT, False)
    for vm in (bulk, general):
        if capacity is not None:
            vm.mmu.trace.resize(capacity)
    answer = None
    for step, (name, args) in enumerate(seq):
        answer = run(bulk, name, args, float(step))
        assert answer == run(general, name, args, float(step)), (name, args)
        same_state(bulk, general)
    return bulk, answer


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), vm_type=st.sampled_from([DEFAULT, SW_PROTECTED, TDX]))
def test_bulk_and_general_paths_leave_the_same_vm(data: st.DataObject, vm_type: int) -> None:
    bulk, general = new_vm(vm_type, True), new_vm(vm_type, False)
    tdx = vm_type == TDX
    shared = S47 if tdx else 0
    gmem = GMEM if vm_type == SW_PROTECTED else 0
    dirty = data.draw(st.sampled_from([0, LOG_DIRTY]))
    first = region_call(0, 0, 12 * MB, 0, gmem | dirty, tdx)
    seq = [first, ("access", {"vcpu": 0, "gpa": shared, "size": 8 * MB, "access": "write"})]
    if vm_type == DEFAULT:  # transparent huge pages behind slot 1: 2 MiB leaves
        thp = {"userspace_addr": HVA + GB, "len": 16 * MB, "advice": "hugepage"}
        seq += [("host_advise", thp), region_call(1, 2 * GB, 12 * MB, 0, dirty, False)]
        seq.append(("access", {"vcpu": 0, "gpa": 2 * GB + 2 * MB, "size": 10 * MB}))
    if tdx:  # private pages in the mirror root too
        private = {"address": 0, "size": 12 * MB, "attributes": PRIVATE}
        prefault = {"vcpu": 0, "gpa": 0, "size": 8 * MB}
        seq += [("set_memory_attributes", private), ("pre_fault", prefault)]
    slots: dict[int, tuple[int, int, int, int]] = {}
    for step in range(data.draw(st.integers(5, 18))):
        name, args = seq[step] if step < len(seq) else data.draw(calls(vm_type, slots))
        at = float(step)
        answer = run(bulk, name, args, at)
        assert answer == run(general, name, args, at), (name, args)
        same_state(bulk, general)
        if name == "set_user_memory_region" and not isinstance(answer, tuple):
            sid, size = args["slot"], args["memory_size"]
            layout = (args["guest_phys_addr"], size, args["userspace_addr"] - HVA - sid * GB)
            if size:
                slots[sid] = (*layout, args["flags"] & ~GMEM if tdx else args["flags"])
            else:
                slots.pop(sid, None)


# Whole GiBs of huge host pages: (slot gpa, slot size, access gpa, access size, a 4 KiB
# write first, making a table the run must stop at or go around). At 510 GiB the run crosses
# a level-3 table.
HUGE_RUNS = [
    (0, 4 * GB, 0, 4 * GB, None),
    (GB, 5 * GB, GB + 6 * MB, 3 * GB, None),
    (0, 6 * GB, 0, 6 * GB, 2 * GB + 4 * MB),
    (510 * GB, 4 * GB, 510 * GB, 4 * GB, None),
]
THP = ("host_advise", {"advice": "hugepage"})
HUGETLB_1G = ("host_map", {"page_size": GB})


@pytest.mark.parametrize("capacity", [None, 100, 3 * 512 + 1, 5000])
@pytest.mark.parametrize("host", [THP, HUGETLB_1G], ids=["thp", "1g"])
@pytest.mark.parametrize("shape", HUGE_RUNS)
def test_runs_of_huge_leaves_match_the_general_path(
    shape: tuple[int, int, int, int, int | None],
    host: tuple[str, dict[str, Any]],
    capacity: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-pass huge paths (`map_2m_tables`: missing level-2 tables built and filled at
    once; `map_huge_run`: a table's missing entries) leave what one fault per huge leaf
    leaves, the trace ring's tail included whatever its capacity."""
    gpa, size, at, length, first_write = shape
    seq: list[tuple[str, dict[str, Any]]] = [
        (host[0], {"userspace_addr": HVA, "len": size, **host[1]}),
        region_call(0, gpa, size, 0, 0, False),
    ]
    if first_write is not None:
        seq.append(("access", {"vcpu": 0, "gpa": first_write, "size": PAGE, "access": "write"}))
    seq.append(("access", {"vcpu": 0, "gpa": at, "size": length, "access": "write"}))
    one_pass: list[int] = []
    for name in ("map_2m_tables", "map_huge_run"):
        original = getattr(FaultPath, name)

        def spy(self: FaultPath, *args: Any, _original: Any = original) -> int:
            done = int(_original(self, *args))
            one_pass.append(done)
            return done

        monkeypatch.setattr(FaultPath, name, spy)
    both(seq, capacity)
    assert sum(one_pass) >= 2 * GB // PAGE  # the one-pass paths did the work


# Huge-page recovery (dirty logging turned off) over slots of leaf tables: host backings,
# slot layouts (aligned, crossing 1 GiB, GPA and HVA disagreeing within 2 MiB) and what may
# keep a table from collapsing (a freed host page, a partial zap, a table outside the slot).
BACKINGS = {
    "thp": ("host_advise", {"advice": "hugepage"}, PAGE),
    "hugetlb_2m": ("host_map", {"page_size": 2 * MB}, 2 * MB),
    "hugetlb_1g": ("host_map", {"page_size": GB}, GB),
}
recovery_gpas = st.sampled_from([0, GB - 6 * MB, 2 * MB + 5 * PAGE, 3 * GB])
recovery_sizes = st.sampled_from([6 * MB + 3 * PAGE, 64 * MB, 200 * MB, GB + 10 * MB])


def host_backing(kind: str, size: int) -> tuple[str, dict[str, Any]]:
    """The host call backing [HVA, HVA + size) (rounded up to whole host pages)."""
    name, args, page = BACKINGS[kind]
    return (name, {"userspace_addr": HVA, "len": -(-size // page) * page, **args})


@st.composite
def disturbances(draw: st.DrawFn, gpa: int, size: int, off: int) -> list[tuple]:
    """Calls that leave some leaf tables of the slot partial, empty or on freed host pages."""
    out: list[tuple] = []
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.sampled_from([0, 4 * MB + 3 * PAGE, size // 2, size - 3 * PAGE]))
        kind = draw(st.sampled_from(["discard", "zap", "write", "read"]))
        length = draw(st.sampled_from([PAGE, 2 * MB, 5 * MB + PAGE]))
        if kind == "discard":
            out.append(("host_discard", {"userspace_addr": HVA + off + at, "len": length}))
        elif kind == "zap":
            out.append(
                ("zap", {"scope": "range", "gpa": gpa + at, "size": length, "roots": "both"})
            )
        else:
            args = {"vcpu": 0, "gpa": gpa + at, "size": length, "access": kind}
            out.append(("access", args))
    return out


@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    backing=st.sampled_from(sorted(BACKINGS)),
    gpa=recovery_gpas,
    size=recovery_sizes,
    off=st.sampled_from([0, 2 * MB, 5 * PAGE]),
    capacity=st.sampled_from([None, 100, 3 * 513 + 1, 5000]),
    log_first=st.booleans(),
)
def test_recovery_matches_the_general_path(
    data: st.DataObject,
    backing: str,
    gpa: int,
    size: int,
    off: int,
    capacity: int | None,
    log_first: bool,
) -> None:
    """Dirty logging on then off over a slot of many leaf tables: the bulk recovery (a level-2
    table's leaf tables at once) leaves what the per-table loop leaves, the 1 GiB pass after
    it included. Logging is on from the start (faults at 4K) or turned on after huge faults
    (eager split); turning it on and off again recovers once more."""
    seq = [host_backing(backing, off + size), region_call(0, gpa, size, off, 0, False)]
    write = ("access", {"vcpu": 0, "gpa": gpa, "size": size, "access": "write"})
    log_on, log_off = (region_call(0, gpa, size, off, flags, False) for flags in (LOG_DIRTY, 0))
    seq += [log_on, write] if log_first else [write, log_on]
    seq += data.draw(disturbances(gpa, size, off))
    seq.append(log_off)
    if data.draw(st.booleans()):
        seq += [log_on, *data.draw(disturbances(gpa, size, off)), log_off]
    both(seq, capacity)


@pytest.mark.parametrize("capacity", [None, 3 * 513 + 1])
@pytest.mark.parametrize("backing", ["thp", "hugetlb_1g"])
def test_recovery_of_whole_gibs_is_done_in_bulk(
    backing: str, capacity: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 GiB faulted at 4K while logging, then logging off: the bulk recovery replaces the
    leaf tables (all but one a zap emptied) a level-2 table at a time and leaves what the
    per-table loop leaves; on 1 GiB host pages the 1 GiB pass follows."""
    size = 2 * GB
    seq = [
        host_backing(backing, size),
        region_call(0, GB, size, 0, LOG_DIRTY, False),
        ("access", {"vcpu": 0, "gpa": GB, "size": size, "access": "write"}),
        ("zap", {"scope": "range", "gpa": GB + 6 * MB, "size": 2 * MB, "roots": "both"}),
        region_call(0, GB, size, 0, 0, False),
    ]
    replaced: list[int] = []
    original = Mmu.replace_leaf_tables

    def spy(self: Mmu, root: Any, table: int, pos: Any, *args: Any) -> None:
        replaced.append(len(pos))
        original(self, root, table, pos, *args)

    monkeypatch.setattr(Mmu, "replace_leaf_tables", spy)
    bulk, answer = both(seq, capacity)
    assert replaced == [511, 512]  # one pass per level-2 table, the general path none
    zap, gib = answer["zap"], backing == "hugetlb_1g"
    # The 1 GiB pass takes both level-2 tables, the empty leaf table in the first one too.
    assert zap["huge_pages_recovered"] == 1023 + (2 if gib else 0)
    assert zap["tables_freed"] == 1023 + (3 if gib else 0)
    pages = bulk.stats()
    assert (pages["pages_1g"], pages["pages_2m"]) == ((2, 0) if gib else (0, 1023))


host_spans = st.tuples(st.integers(0, 3 * 512), st.integers(1, 3 * 512))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    maps=st.lists(st.tuples(host_spans, st.sampled_from([1, 2, 3])), max_size=4),
    discards=st.lists(host_spans, max_size=4),
    pages=st.lists(st.one_of(st.integers(0, 2700), st.integers(0, 1 << 20)), max_size=40),
)
def test_host_queries_in_bulk_match_the_scalar_ones(
    maps: list[tuple[tuple[int, int], int]],
    discards: list[tuple[int, int]],
    pages: list[int],
) -> None:
    """`HostMemory.mapping_levels` and `IntervalSet.overlaps` (the bulk recovery's checks)
    answer what `mapping_level` and `freed.overlap` answer page by page, over page-size
    runs that cut huge pages (1 GiB runs placed so that some hold a whole one)."""
    host = HostMemory()
    for (first, n), level in maps:
        first = first if level < 3 else first * 512  # pages of 1 GiB runs, in 2 MiB steps
        host.set_page_size(first, first + (n if level < 3 else n * 512), level, "hugetlb")
    for first, n in discards:
        host.discard(first, first + n)
    at = np.array(pages, dtype=np.int64)
    assert host.mapping_levels(at).tolist() == [host.mapping_level(p) for p in pages]
    for n in (1, 512):
        want = [host.freed.overlap(p, p + n) > 0 for p in pages]
        assert host.freed.overlaps(at, n).tolist() == want
