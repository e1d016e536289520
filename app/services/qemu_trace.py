"""QEMU's `kvm_set_user_memory` trace lines, parsed into memslot calls.

QEMU traces every KVM_SET_USER_MEMORY_REGION(2) it issues (accel/kvm/trace-events). Two
formats exist:

- older QEMU: `kvm_set_user_memory Slot#%d flags=0x%x gpa=0x%x size=0x%x ua=0x%x ret=%d`,
  where the slot is the kernel's 32-bit value (address space in bits 16 and up, so
  `Slot#65539` is SMM slot 3);
- newer QEMU: `kvm_set_user_memory AddrSpace#%d Slot#%d flags=… gpa=… size=… ua=…
  guest_memfd=%d guest_memfd_offset=0x%x ret=%d`.

The `log` trace backend prefixes each line with `pid@seconds.micros:`; both forms are read.
`ret` is what the ioctl returned to QEMU: 0, or a negative errno.

A line that names `kvm_set_user_memory` but does not parse is an error (reported with its
line number); blank lines, `#` comments and every other line are ignored and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

EVENT = "kvm_set_user_memory"
KVM_MEM_GUEST_MEMFD = 1 << 2

_NUM = r"(0[xX][0-9a-fA-F]+|\d+)"
# The whole line as QEMU prints it (either format): the fast path. Anything else goes
# through the field-by-field parser, which says what is wrong.
_EXACT = re.compile(
    r"^\s*(?:\d+@\d+(?:\.\d+)?:\s*)?kvm_set_user_memory\s+(?:AddrSpace#(\d+)\s+)?Slot#(\d+)"
    rf"\s+flags={_NUM}\s+gpa={_NUM}\s+size={_NUM}\s+ua={_NUM}"
    rf"(?:\s+guest_memfd=(-?\d+)\s+guest_memfd_offset={_NUM})?\s+ret=(-?\d+)\s*$"
)
_PREFIX = re.compile(r"^\s*(?:\d+@\d+(?:\.\d+)?:\s*)?kvm_set_user_memory\b\s*(?P<rest>.*)$")
_ADDRSPACE = re.compile(r"^AddrSpace#(?P<as>\d+)\s+")
_SLOT = re.compile(r"^Slot#(?P<slot>\d+)\s+")
_FIELD = re.compile(r"(?P<key>[a-z_]+)=(?P<value>-?(?:0[xX][0-9a-fA-F]+|\d+))(?:\s+|$)")
_REQUIRED = ("flags", "gpa", "size", "ua", "ret")
_KNOWN = frozenset(_REQUIRED) | {"guest_memfd", "guest_memfd_offset"}
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class TraceCall:
    """One traced KVM_SET_USER_MEMORY_REGION: the call and what the kernel answered."""

    line: int
    slot: int  # the kernel's u32 slot: as_id << 16 | id
    flags: int
    gpa: int
    size: int
    ua: int
    ret: int
    guest_memfd: int | None = None
    guest_memfd_offset: int = 0

    @property
    def as_id(self) -> int:
        return self.slot >> 16

    @property
    def expected_errno(self) -> int | None:
        """The errno the trace says the kernel answered (None: success)."""
        return -self.ret if self.ret < 0 else None

    def to_op(self) -> dict[str, Any]:
        """The call as an operation in the journal's (name, fields) form."""
        return {
            "op": "set_user_memory_region",
            "slot": self.slot,
            "flags": self.flags,
            "guest_phys_addr": self.gpa,
            "memory_size": self.size,
            "userspace_addr": self.ua,
            # QEMU's guest_memfd is a descriptor of its own process: never the VM's.
            "guest_memfd": 0,
            "guest_memfd_offset": 0,
        }


@dataclass(frozen=True)
class TraceError:
    line: int
    message: str


@dataclass
class Trace:
    calls: list[TraceCall] = field(default_factory=list)
    ignored: int = 0
    errors: list[TraceError] = field(default_factory=list)
    lines: int = 0


class TraceLineError(ValueError):
    pass


def _int(text: str) -> int:
    return int(text, 16) if text[:2].lower() == "0x" or text[:3].lower() == "-0x" else int(text)


def parse_line(text: str, line: int) -> TraceCall | None:
    """One trace line: a TraceCall, None when the line is not a `kvm_set_user_memory` event
    (ignored), TraceLineError when it is one but does not parse."""
    if EVENT not in text:
        return None
    e = _EXACT.match(text)
    if e is not None:
        as_s, slot_s, fl, gpa, size, ua, fd, fd_off, ret = e.groups()
        slot = int(slot_s)
        if as_s is not None:
            if slot > 0xFFFF or int(as_s) > 0xFFFF:
                raise TraceLineError("AddrSpace# and Slot# are 16-bit each")
            slot |= int(as_s) << 16
        call = TraceCall(
            line=line,
            slot=slot,
            flags=_int(fl),
            gpa=_int(gpa),
            size=_int(size),
            ua=_int(ua),
            ret=int(ret),
            guest_memfd=None if fd is None else int(fd),
            guest_memfd_offset=0 if fd_off is None else _int(fd_off),
        )
        if call.slot > _U32 or call.flags > _U32:
            raise TraceLineError("slot and flags are 32-bit")
        if max(call.gpa, call.size, call.ua, call.guest_memfd_offset) > _U64:
            raise TraceLineError("gpa, size, ua and guest_memfd_offset are unsigned 64-bit")
        return call
    m = _PREFIX.match(text)
    if m is None:
        return None
    rest = m.group("rest").strip()
    as_id: int | None = None
    a = _ADDRSPACE.match(rest)
    if a is not None:
        as_id = int(a.group("as"))
        rest = rest[a.end() :]
    s = _SLOT.match(rest + " ")
    if s is None:
        raise TraceLineError("expected `Slot#N` (optionally after `AddrSpace#A`)")
    slot = int(s.group("slot"))
    rest = (rest + " ")[s.end() :]
    fields: dict[str, int] = {}
    pos = 0
    while pos < len(rest):
        f = _FIELD.match(rest, pos)
        if f is None:
            raise TraceLineError(f"cannot read {rest[pos : pos + 40].strip()!r}")
        key = f.group("key")
        if key not in _KNOWN:
            raise TraceLineError(f"unknown field {key!r}")
        if key in fields:
            raise TraceLineError(f"field {key!r} given twice")
        fields[key] = _int(f.group("value"))
        pos = f.end()
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise TraceLineError(f"missing {', '.join(missing)}")
    if as_id is not None:
        if slot > 0xFFFF or as_id > 0xFFFF:
            raise TraceLineError("AddrSpace# and Slot# are 16-bit each")
        slot = as_id << 16 | slot
    if slot > _U32 or fields["flags"] > _U32:
        raise TraceLineError("slot and flags are 32-bit")
    for key in ("gpa", "size", "ua", "guest_memfd_offset"):
        if not 0 <= fields.get(key, 0) <= _U64:
            raise TraceLineError(f"{key} is not an unsigned 64-bit value")
    return TraceCall(
        line=line,
        slot=slot,
        flags=fields["flags"],
        gpa=fields["gpa"],
        size=fields["size"],
        ua=fields["ua"],
        ret=fields["ret"],
        guest_memfd=fields.get("guest_memfd"),
        guest_memfd_offset=fields.get("guest_memfd_offset", 0),
    )


def parse(text: str, *, first_line: int = 1) -> Trace:
    """A whole trace. Line numbers start at `first_line` (a chunk of a longer file)."""
    out = Trace()
    for n, raw in enumerate(text.splitlines(), start=first_line):
        out.lines += 1
        try:
            call = parse_line(raw, n)
        except TraceLineError as e:
            out.errors.append(TraceError(n, str(e)))
            continue
        if call is None:
            out.ignored += 1
        else:
            out.calls.append(call)
    return out


def format_line(call: TraceCall, *, style: str = "addrspace", pid: int | None = None) -> str:
    """A call as QEMU would trace it (`style` "addrspace": newer QEMU, "slot": older)."""
    prefix = f"{pid}@{call.line}.000000:" if pid is not None else ""
    common = f"flags=0x{call.flags:x} gpa=0x{call.gpa:x} size=0x{call.size:x} ua=0x{call.ua:x}"
    if style == "slot":
        return f"{prefix}{EVENT} Slot#{call.slot} {common} ret={call.ret}"
    fd = -1 if call.guest_memfd is None else call.guest_memfd
    return (
        f"{prefix}{EVENT} AddrSpace#{call.as_id} Slot#{call.slot & 0xFFFF} {common} "
        f"guest_memfd={fd} guest_memfd_offset=0x{call.guest_memfd_offset:x} ret={call.ret}"
    )
