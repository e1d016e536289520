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


def default_engine() -> EnginePort:
    from app.engine import codec
    from app.engine.vm import Vm as _Vm

    return EnginePort(
        create=_Vm.create,
        dumps=codec.dumps,
        loads=codec.loads,
        corrupt_snapshot=codec.CorruptSnapshot,
    )
