"""Journals written before operations were types still replay to the same state.

`data/journal_v1.json` holds the journal records (op, args, error, at, meta) that the service
wrote at commit 2f8ebcb for four VMs (default, SW-protected, TDX, and one destroyed), driven
through `VmService` on SQLite with a workload covering every journaled operation, and the
`codec.digest` of each VM after its last record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.engine import Vm, codec
from app.engine.errors import KvmError
from app.engine.ops import parse

FIXTURE = json.loads((Path(__file__).parent / "data" / "journal_v1.json").read_text())


def replay(create: dict[str, Any], records: list[dict[str, Any]]) -> Vm:
    vm = Vm.create(**create)
    for r in records:
        vm.table_budget = r["meta"]["table_budget"]
        try:
            op = parse(r["op"], r["args"])
            vm.apply(op, at=r["at"], durations=r["meta"].get("durations"))
            outcome = None
        except KvmError as e:
            outcome = e.errno
        assert outcome == (r["error"] or {}).get("errno"), r
    return vm


@pytest.mark.parametrize("case", FIXTURE["vms"], ids=lambda c: c["name"])
def test_a_journal_of_the_string_op_era_replays_to_its_digest(case: dict[str, Any]) -> None:
    vm = replay(case["create"], case["records"])
    assert codec.digest(vm) == case["digest"]


def test_the_fixture_covers_every_operation() -> None:
    seen = {r["op"] for case in FIXTURE["vms"] for r in case["records"]}
    assert len(seen) == 23


@pytest.mark.parametrize("case", FIXTURE["vms"], ids=lambda c: c["name"])
def test_every_kind_of_vm_state_survives_a_snapshot(case: dict[str, Any]) -> None:
    vm = replay(case["create"], case["records"])
    back = codec.loads(codec.dumps(vm))
    assert codec.digest(back) == case["digest"]
    assert back.audit() == vm.audit()
