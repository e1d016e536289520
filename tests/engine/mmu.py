"""Helpers the MMU engine tests share: a memslot, a leaf lookup, leaf counts, the audit."""

from __future__ import annotations

from app.engine import Vm
from app.engine.ops import parse


def region(vm: Vm, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> dict:
    return vm.apply(
        parse(
            "set_user_memory_region",
            dict(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva),
        ),
    )


def leaf(vm: Vm, gpa: int) -> dict | None:
    (root,) = vm.translate(gpa)["roots"]
    last = root["walk"][-1]
    return last if last.get("present") and last.get("leaf") else None


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
