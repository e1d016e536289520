"""Operations as values: the shape checks of parsing a call, argument types."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path
from typing import Any

import pytest

from app.engine import KvmError, Vm, ops
from app.engine.op import REGISTRY
from app.engine.ops import parse
from tests.engine import mmu as kit


# -- regression cases from the engine review --------------------------------------------------
def test_host_map_with_list_page_size_is_einval() -> None:
    vm = Vm.create(kit.DEFAULT)
    args = dict(userspace_addr=kit.HVA, len=kit.M2, page_size=[kit.M2])
    assert kit.rejected(vm, "host_map", args).errno == errno.EINVAL


@pytest.mark.parametrize("op", [["access"], ("access",), None, 7])
def test_non_string_op_is_einval(op: Any) -> None:
    vm = Vm.create(kit.DEFAULT)
    assert kit.rejected(vm, op, {}).errno == errno.EINVAL


def test_access_with_bool_gpa_is_einval() -> None:
    vm = Vm.create(kit.DEFAULT)
    kit.region(vm, 0, 0, kit.MB, kit.HVA)
    assert kit.rejected(vm, "access", dict(vcpu=0, gpa=True, size=kit.PAGE)).errno == errno.EINVAL
    assert vm.stats()["pages_4k"] == 0


def test_set_user_memory_region_with_unknown_key_is_einval_and_adds_no_slot() -> None:
    vm = Vm.create(kit.DEFAULT)
    args = dict(slot=0, flags=0, guest_phys_adr=0, memory_size=kit.PAGE, userspace_addr=kit.HVA)
    assert kit.rejected(vm, "set_user_memory_region", args).errno == errno.EINVAL
    assert vm.memslots() == []
    with pytest.raises(KvmError) as info:
        vm.memslot(0)
    assert info.value.errno == errno.ENOENT


# -- parsing journal records -------------------------------------------------------------------
def test_every_journaled_record_parses_and_round_trips_through_to_json() -> None:
    fixture = json.loads((Path(__file__).parent / "data" / "journal_v1.json").read_text())
    for case in fixture["vms"]:
        for rec in case["records"]:
            op = parse(rec["op"], rec["args"])
            assert op.NAME == op.name == rec["op"]
            assert parse(op.NAME, op.to_json()) == op
            assert {k: v for k, v in op.to_json().items() if k in rec["args"]} == rec["args"]


def test_unknown_names_and_malformed_records_are_einval() -> None:
    for name, args in [("nope", {}), ("access", {"vcpu": 0}), ("access", [1]), ("zap", {"x": 1})]:
        with pytest.raises(KvmError) as e:
            parse(name, args)
        assert e.value.errno == errno.EINVAL


def test_operations_are_frozen_values_with_defaults() -> None:
    op = ops.Access(vcpu=0, gpa=0x1000)
    assert (op.size, op.access, op.private) == (kit.PAGE, "read", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.gpa = 0  # type: ignore[misc]
    assert ops.Access.from_json({"vcpu": 0, "gpa": 0x1000}) == op
    assert set(ops.NAMES) == set(REGISTRY) and len(ops.NAMES) == 31
