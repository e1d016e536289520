"""The few engine entry points the service layer uses, bound lazily.

Binding them through one small object keeps `app.services` importable while the engine
is being written, and lets tests substitute a codec that fails on purpose.
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
    from app.engine.vm import Vm as _Vm

    try:
        from app.engine import codec
    except ImportError:  # the codec lands after the rest of the engine: journal-only until then
        return EnginePort(
            create=_Vm.create,
            dumps=_no_codec,
            loads=_no_codec,
            corrupt_snapshot=_NoCodec,
        )
    return EnginePort(
        create=_Vm.create,
        dumps=codec.dumps,
        loads=codec.loads,
        corrupt_snapshot=codec.CorruptSnapshot,
    )


class _NoCodec(Exception):
    pass


def _no_codec(_: Any) -> Any:
    raise _NoCodec("app.engine.codec is not available: snapshots are disabled")
