"""Every operation the engine applies, by journal name: `parse` turns a journal record
(`op`, `args`) back into its operation.

The classes live beside what they change; this module only gathers them.
"""

from __future__ import annotations

from typing import Any

from .attributes import SetMemoryAttributes
from .capabilities import EnableCap
from .dirty import ClearDirtyLog, GetDirtyLog
from .errors import einval
from .faults import Accept, Access, Load, PreFault, Store
from .gmem import CreateGuestMemfd, GmemClose, GmemFallocate, GmemWrite
from .hostmem import HostAdvise, HostDiscard, HostMap, HostWrite
from .hypercall import CompleteHypercall, Hypercall, TdvmcallMapGpa
from .memslots import SetUserMemoryRegion
from .op import REGISTRY, Op
from .tdx_lifecycle import TdxFinalizeVm, TdxInitMemRegion, TdxInitVcpu, TdxInitVm
from .vcpu import CreateVcpu, SetVcpuSmm
from .zap import Destroy, ExplicitZap, RecoverNxHugePages, SetZapPolicy

__all__ = [
    "Accept",
    "Access",
    "ClearDirtyLog",
    "CompleteHypercall",
    "CreateGuestMemfd",
    "CreateVcpu",
    "Destroy",
    "EnableCap",
    "ExplicitZap",
    "GetDirtyLog",
    "GmemClose",
    "GmemFallocate",
    "GmemWrite",
    "HostAdvise",
    "HostDiscard",
    "HostMap",
    "HostWrite",
    "Hypercall",
    "Load",
    "Op",
    "PreFault",
    "RecoverNxHugePages",
    "SetMemoryAttributes",
    "SetUserMemoryRegion",
    "SetVcpuSmm",
    "SetZapPolicy",
    "Store",
    "TdvmcallMapGpa",
    "TdxFinalizeVm",
    "TdxInitMemRegion",
    "TdxInitVcpu",
    "TdxInitVm",
    "parse",
]

NAMES = tuple(REGISTRY)


def parse(name: object, args: Any = None) -> Op:
    """The operation a journal record (`op`, `args`) holds; EINVAL for an unknown name or a
    record whose keys do not fit it."""
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise einval(f"unknown operation {name!r}")
    return cls.from_json(args)
