"""The QEMU `kvm_set_user_memory` trace parser (both formats, prefixes, bad lines)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.services import qemu_trace
from app.services.qemu_trace import TraceCall, format_line, parse, parse_line
from tests.replay.conftest import TRACES

OLD = "kvm_set_user_memory Slot#65539 flags=0x2 gpa=0xa0000 size=0x20000 ua=0x7f00000a0000 ret=0"
NEW = (
    "4242@1733130000.000137:kvm_set_user_memory AddrSpace#1 Slot#3 flags=0x2 gpa=0xa0000 "
    "size=0x20000 ua=0x7f00000a0000 guest_memfd=-1 guest_memfd_offset=0x0 ret=0"
)


def test_older_format_carries_the_address_space_in_bits_16_and_up() -> None:
    call = parse_line(OLD, 7)
    assert call is not None
    assert (call.line, call.slot, call.as_id, call.slot & 0xFFFF) == (7, 65539, 1, 3)
    assert (call.flags, call.gpa, call.size, call.ua, call.ret) == (
        2,
        0xA0000,
        0x20000,
        0x7F00000A0000,
        0,
    )
    assert call.expected_errno is None


def test_newer_format_with_pid_prefix_is_the_same_call() -> None:
    old, new = parse_line(OLD, 1), parse_line(NEW, 1)
    assert new is not None and old is not None
    assert (new.slot, new.flags, new.gpa, new.size, new.ua) == (
        old.slot,
        old.flags,
        old.gpa,
        old.size,
        old.ua,
    )
    assert new.guest_memfd == -1


def test_negative_ret_is_the_errno_the_kernel_answered() -> None:
    call = parse_line(OLD.replace("ret=0", "ret=-22"), 1)
    assert call is not None and call.ret == -22 and call.expected_errno == 22


def test_to_op_is_the_journal_form_of_set_user_memory_region() -> None:
    call = parse_line(OLD, 1)
    assert call is not None
    assert call.to_op() == {
        "op": "set_user_memory_region",
        "slot": 65539,
        "flags": 2,
        "guest_phys_addr": 0xA0000,
        "memory_size": 0x20000,
        "userspace_addr": 0x7F00000A0000,
        "guest_memfd": 0,
        "guest_memfd_offset": 0,
    }


def test_comments_other_events_and_blank_lines_are_ignored_and_counted() -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            "4242@1.0:kvm_vm_ioctl type 0xc020ae46, arg 0x7ffd",
            OLD,
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0",  # no size, ua, ret
            "kvm_set_user_memory Slot#x flags=0x0",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x0 ret=0 bogus=1",
            NEW,
        ]
    )
    trace = parse(text)
    assert trace.lines == 8
    assert trace.ignored == 3
    assert [c.line for c in trace.calls] == [4, 8]
    assert [(e.line, e.message.split(" ")[0]) for e in trace.errors] == [
        (5, "missing"),
        (6, "expected"),
        (7, "unknown"),
    ]


def test_chunk_line_numbers_continue_from_first_line() -> None:
    trace = parse(OLD + "\nnot a trace\nkvm_set_user_memory junk\n", first_line=101)
    assert [c.line for c in trace.calls] == [101]
    assert [e.line for e in trace.errors] == [103]


def test_out_of_range_fields_are_errors_not_crashes() -> None:
    trace = parse(
        "kvm_set_user_memory AddrSpace#1 Slot#70000 flags=0x0 gpa=0x0 size=0x0 ua=0x0 ret=0\n"
        "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x1ffffffffffffffff size=0x0 ua=0x0 ret=0\n"
        "kvm_set_user_memory Slot#4294967296 flags=0x0 gpa=0x0 size=0x0 ua=0x0 ret=0\n"
    )
    assert not trace.calls and [e.line for e in trace.errors] == [1, 2, 3]


def test_every_sample_trace_parses_without_errors() -> None:
    for path in sorted(TRACES.glob("*.trace")):
        trace = parse(path.read_text())
        assert trace.calls, path
        assert not trace.errors, (path, trace.errors[:3])
    boot = parse((TRACES / "pc-boot-smm.trace").read_text())
    assert len(boot.calls) >= 300
    assert any(c.as_id == 1 for c in boot.calls)
    vga = parse((TRACES / "vga-toggle.trace").read_text())
    assert any(c.slot >= 65536 for c in vga.calls)  # the older format's SMM slots


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(
    st.builds(
        TraceCall,
        line=st.just(1),
        slot=st.integers(0, 1).flatmap(lambda a: st.integers(0, 0xFFFF).map(lambda s: a << 16 | s)),
        flags=st.integers(0, 7),
        gpa=st.integers(0, (1 << 64) - 1),
        size=st.integers(0, (1 << 64) - 1),
        ua=st.integers(0, (1 << 64) - 1),
        ret=st.integers(-4095, 0),
    ),
    st.sampled_from(["slot", "addrspace"]),
    st.sampled_from([None, 4242]),
)
def test_format_then_parse_is_the_identity(call: TraceCall, style: str, pid: int | None) -> None:
    text = format_line(call, style=style, pid=pid)
    back = qemu_trace.parse_line(text, 1)
    assert back is not None
    assert (back.slot, back.flags, back.gpa, back.size, back.ua, back.ret) == (
        call.slot,
        call.flags,
        call.gpa,
        call.size,
        call.ua,
        call.ret,
    )
