"""Helpers the MMU engine tests share: a memslot, a leaf lookup, leaf counts, the audit."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from app.engine import KvmError, Vm, codec, uapi
from app.engine.ops import parse

# Constants from the uAPI (never re-typed numbers).
DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROTECTED = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
PRIVATE = int(uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
LOG_DIRTY = int(uapi.KVM_MEM_LOG_DIRTY_PAGES)
READONLY = int(uapi.KVM_MEM_READONLY)
GMEM = int(uapi.MemFlag.KVM_MEM_GUEST_MEMFD)
MMAP = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_MMAP)
INIT_SHARED = int(uapi.GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)
PAGE = uapi.PAGE_SIZE
MB, GB = 1 << 20, 1 << 30
M2 = 2 * MB
HVA = 1 << 30
S47 = 1 << 47  # a 4-level TD's shared bit (GPA bit 47)
MANUAL_PROTECT_CAP = int(uapi.Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
DISABLE_QUIRKS2 = int(uapi.Cap.KVM_CAP_DISABLE_QUIRKS2)
SLOT_ZAP_ALL = int(uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL)
TRACK, REMOVE = "TDH.MEM.TRACK", "TDH.MEM.PAGE.REMOVE"


def region(vm: Vm, slot: int, gpa: int, size: int, hva: int, flags: int = 0, **kw: int) -> dict:
    args = dict(
        slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva, **kw
    )
    return vm.apply(parse("set_user_memory_region", args))


def leaf(vm: Vm, gpa: int) -> dict | None:
    (root,) = vm.translate(gpa)["roots"]
    last = root["walk"][-1]
    return last if last.get("present") and last.get("leaf") else None


def last_entry(vm: Vm, gpa: int) -> dict:
    """The deepest entry of the walk of `gpa` (one root), decoded."""
    (root,) = vm.translate(gpa)["roots"]
    return root["walk"][-1]


def dirty_bits_set(log: dict) -> list[int]:
    """The set bits of a GET_DIRTY_LOG answer's bitmap (base64, little-endian words)."""
    raw = base64.b64decode(log["bitmap"])
    return [i for i in range(len(raw) * 8) if raw[i // 8] >> (i % 8) & 1]


def pages(vm: Vm) -> tuple[int, int, int]:
    s = vm.stats()
    return s["pages_4k"], s["pages_2m"], s["pages_1g"]


def check(vm: Vm) -> None:
    a = vm.audit()
    assert a["ok"], a["violations"]
    s = vm.stats()
    assert {"4k": s["pages_4k"], "2m": s["pages_2m"], "1g": s["pages_1g"]} == a["checked"]["leaves"]


def apply_json(vm: Vm, name: str, args: dict | None = None) -> dict:
    """A call as the journal holds it (name, args), parsed where the call is made: for checks
    that expect the record's shape itself to be refused."""
    return vm.apply(parse(name, args))


def access(vm: Vm, gpa: int, size: int = PAGE, kind: str = "read") -> dict:
    return vm.apply(parse("access", dict(vcpu=0, gpa=gpa, size=size, access=kind)))


def attrs(vm: Vm, address: int, size: int, private: bool) -> dict:
    return vm.apply(
        parse(
            "set_memory_attributes",
            dict(address=address, size=size, attributes=PRIVATE if private else 0),
        ),
    )


def hugepage(vm: Vm, hva: int, size: int) -> None:
    vm.apply(parse("host_advise", dict(userspace_addr=hva, len=size, advice="hugepage")))


def rejected(vm: Vm, op: Any, args: Any) -> KvmError:
    """Apply a call KVM must reject without changing state; return the error."""
    before = codec.digest(vm)
    with pytest.raises(KvmError) as info:
        vm.apply(parse(op, args))
    assert info.value.state_changed is False
    assert codec.digest(vm) == before
    return info.value


def td_with_gmem(size: int, slots: int = 1) -> tuple[Vm, int]:
    """A TD whose guest_memfd of `size` bytes is split evenly over `slots` adjacent slots,
    all PRIVATE."""
    td = Vm.create(TDX)
    fd = td.apply(parse("create_guest_memfd", dict(size=size)))["fd"]
    part = size // slots
    for s in range(slots):
        region(
            td, s, s * part, part, HVA + s * part, GMEM, guest_memfd=fd, guest_memfd_offset=s * part
        )
    attrs(td, 0, size, True)
    return td, fd


def mirror_leaf_raw(td: Vm, gpa: int) -> str:
    (mirror,) = [r for r in td.translate(gpa)["roots"] if r["role"] == "mirror"]
    last = mirror["walk"][-1]
    assert last["leaf"] is True
    return str(last["raw"])
