"""Helpers the MMU engine tests share: a memslot, a leaf lookup, leaf counts, the audit."""

from __future__ import annotations

from app.engine import Vm


def region(vm: Vm, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> dict:
    return vm.apply(
        "set_user_memory_region",
        dict(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva),
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
