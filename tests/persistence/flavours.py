"""The engines the service-layer tests run on: the real one, and the stand-in of
`fake_engine.py`. A test parametrised over both shows the behaviour holds on the real engine;
the stand-in alone is kept only where a fault has to be injected into the engine itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.engine import codec
from app.services.engine_port import EnginePort
from tests.persistence import fake_engine


@dataclass(frozen=True)
class Flavour:
    name: str
    engine: EnginePort | None  # None: the service's own, the real engine
    step: tuple[str, dict[str, Any]]  # one state-changing call
    count: Callable[[Any], int]  # how many `step`s a VM has taken
    dumps: Callable[[Any], bytes]  # the VM's whole state

    def __str__(self) -> str:
        return self.name


REAL = Flavour(
    "real",
    None,
    # kvm_mmu_zap_all_fast: changes the VM (a new root generation) and is counted.
    ("zap", {"scope": "all", "roots": "shared"}),
    lambda vm: int(vm.stats()["zaps_all_fast"]),
    codec.dumps,
)
FAKE = Flavour(
    "fake",
    fake_engine.FAKE_ENGINE,
    ("bump", {"by": 1}),
    lambda vm: int(vm.state["counter"]),
    fake_engine.dumps,
)
FLAVOURS = [REAL, FAKE]
