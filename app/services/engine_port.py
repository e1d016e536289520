"""The few engine entry points the service layer uses, bound lazily.

Binding them through one small object lets tests substitute an engine or a codec that
fails on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine.vm import Vm
else:
    Vm = Any


@dataclass(frozen=True)
class EnginePort:
    create: Callable[..., Vm]  # Vm.create(vm_type=, vcpus=, paging_levels=, name=)
    dumps: Callable[[Vm], bytes]
    loads: Callable[[bytes], Vm]
    corrupt_snapshot: type[Exception]


def default_engine(page_table_budget_bytes: int | None = None) -> EnginePort:
    """The real engine; `page_table_budget_bytes` caps each VM's page tables (ENOMEM past it)."""
    from app.engine import codec
    from app.engine.vm import DEFAULT_TABLE_BUDGET
    from app.engine.vm import Vm as _Vm

    budget = DEFAULT_TABLE_BUDGET
    if page_table_budget_bytes is not None:
        budget = max(1, page_table_budget_bytes // 4096)

    def create(**kw: Any) -> Vm:
        return _Vm.create(**kw, table_budget=budget)

    def loads(data: bytes) -> Vm:
        vm = codec.loads(data)
        vm.table_budget = budget  # the service's setting, not the one at snapshot time
        return vm

    return EnginePort(
        create=create,
        dumps=codec.dumps,
        loads=loads,
        corrupt_snapshot=codec.CorruptSnapshot,
    )
