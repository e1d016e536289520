"""The few engine entry points the service layer uses, bound lazily.

Binding them through one small object lets tests substitute an engine or a codec that
fails on purpose.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.engine.vm import Vm
else:
    Vm = Any


class OpLike(Protocol):
    """An operation as the service journals it: `name` (the journal's `op`) and its args."""

    @property
    def name(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class JsonOp:
    """A call as a name and JSON args, for an engine that takes its calls by name (a test
    double); the real engine parses records into typed operations (`app.engine.ops`)."""

    name: str
    args: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.args


def _parse_json(name: str, args: Any) -> JsonOp:
    return JsonOp(name, copy.deepcopy(dict(args or {})))


def _apply_by_name(vm: Any, op: Any, at: float | None, durations: list[int] | None) -> Any:
    return vm.apply(op.name, op.to_json(), at=at, durations=durations)


# Bytes per page-table page: budgets are set in bytes, the engine counts tables.
TABLE_BYTES = 4096


def _no_tables(vm: Vm) -> int:
    return 0


def _no_budget(vm: Vm, tables: int) -> None:
    return None


def _no_trace(vm: Vm, records: int) -> None:
    return None


def _always(data: bytes) -> bool:
    return True


def _no_footprint(data: bytes) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class EnginePort:
    create: Callable[..., Vm]  # Vm.create(vm_type=, vcpus=, paging_levels=, name=)
    dumps: Callable[[Vm], bytes]
    loads: Callable[[bytes], Vm]
    corrupt_snapshot: type[Exception]
    # Whether a stored snapshot is of a version this engine decodes (retention keeps the
    # journal behind any other). A test double's snapshots are all readable.
    snapshot_readable: Callable[[bytes], bool] = _always
    # A journal record (`op`, `args`) as an operation, and an operation applied to a VM at a
    # time (`durations`: the zap durations journaled with it, on replay).
    parse: Callable[[str, Any], OpLike] = _parse_json
    apply: Callable[[Vm, Any, float | None, list[int] | None], Any] = _apply_by_name
    # `apply` for a caller that discards the answer (replay): the engine may skip building
    # it. None: `apply`.
    apply_unanswered: Callable[[Vm, Any, float | None, list[int] | None], Any] | None = None
    # Page-table accounting: the tables a VM holds now, and the most it may hold during its
    # next call (the engine answers ENOMEM, before allocating, past it). An engine without
    # page tables (a test double) keeps the defaults: nothing to count, nothing to cap.
    tables_live: Callable[[Vm], int] = _no_tables
    set_table_budget: Callable[[Vm, int], None] = _no_budget
    # What a snapshot's state holds once decoded (`codec.footprint`), read without decoding
    # it: reserved before a fork or a reload is built.
    snapshot_footprint: Callable[[bytes], dict[str, int]] = _no_footprint
    # How many kvmmmu trace records the VM keeps (GET …/trace); 0 turns tracing off.
    set_trace_records: Callable[[Vm, int], None] = _no_trace
    # A snapshot in two steps: `capture` copies what must be consistent (under the VM's lock),
    # `encode` makes the bytes of it afterwards (`dumps` = both). None: `dumps` under the lock.
    capture: Callable[[Vm], Any] | None = None
    encode: Callable[[Any], bytes] | None = None


def default_engine() -> EnginePort:
    """The real engine. Its page-table budget is set by the service before every call."""
    from app.engine import codec, ops
    from app.engine.vm import Vm as _Vm

    def apply(vm: Vm, op: Any, at: float | None, durations: list[int] | None) -> Any:
        return vm.apply(op, at=at, durations=durations)

    def apply_unanswered(vm: Vm, op: Any, at: float | None, durations: list[int] | None) -> Any:
        return vm.apply(op, at=at, durations=durations, answer=False)

    def tables_live(vm: Vm) -> int:
        return int(vm.mmu.pool.live)

    def set_table_budget(vm: Vm, tables: int) -> None:
        vm.table_budget = tables

    def set_trace_records(vm: Vm, records: int) -> None:
        if vm.mmu.trace.capacity != records:
            vm.mmu.trace.resize(records)

    return EnginePort(
        create=_Vm.create,
        dumps=codec.dumps,
        loads=codec.loads,
        corrupt_snapshot=codec.CorruptSnapshot,
        snapshot_readable=codec.readable,
        parse=ops.parse,
        apply=apply,
        apply_unanswered=apply_unanswered,
        tables_live=tables_live,
        set_table_budget=set_table_budget,
        snapshot_footprint=codec.footprint,
        set_trace_records=set_trace_records,
        capture=codec.capture,
        encode=codec.encode,
    )
