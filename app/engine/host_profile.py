"""The host's KVM module parameters a VM runs under (kvm / kvm_intel module parameters).

| field | kernel parameter | default here |
|---|---|---|
| `tdp_mmu` | `kvm.tdp_mmu` | on; off is EOPNOTSUPP: the shadow MMU is not modelled |
| `eager_page_split` | `kvm.eager_page_split` | on: enabling dirty logging splits huge leaves |
| `nx_huge_pages` | `kvm.nx_huge_pages` (iTLB multihit) | off: exec faults may map huge |
| `enable_pml` | `kvm_intel.pml` | off: dirty logging write-protects |

The defaults are what vkmmu modelled before host profiles existed, so every VM journaled
before keeps its behaviour. docs/engine.md "Host profile" says what each one changes.
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass
from typing import Any

from .errors import KvmError, einval


@dataclass(frozen=True, slots=True)
class HostProfile:
    enable_pml: bool = False
    eager_page_split: bool = True
    nx_huge_pages: bool = False
    tdp_mmu: bool = True

    def to_dict(self) -> dict[str, bool]:
        # Not `dataclasses.asdict` (a recursive deep copy): every VM's `info()` calls this.
        return {
            "enable_pml": self.enable_pml,
            "eager_page_split": self.eager_page_split,
            "nx_huge_pages": self.nx_huge_pages,
            "tdp_mmu": self.tdp_mmu,
        }

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_HOST


DEFAULT_HOST = HostProfile()
FIELDS = tuple(f.name for f in dataclasses.fields(HostProfile))


def host_profile(value: object, base: HostProfile = DEFAULT_HOST) -> HostProfile:
    """A profile from `{"enable_pml": …, …}` over `base` (missing keys keep base's values).
    `tdp_mmu: false` is EOPNOTSUPP: vkmmu models the TDP MMU only."""
    if value is None:
        return base
    if isinstance(value, HostProfile):
        prof = value
    else:
        if not isinstance(value, dict):
            raise einval("host must be an object")
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise einval(f"host: unknown parameter {unknown[0]!r}")
        for k, v in value.items():
            if not isinstance(v, bool):
                raise einval(f"host.{k} must be true or false")
        prof = dataclasses.replace(base, **value)
    if not prof.tdp_mmu:
        raise KvmError(
            errno.EOPNOTSUPP,
            "host.tdp_mmu=false: the shadow MMU is not modelled (vkmmu models the TDP MMU only)",
        )
    return prof


def profile_json(p: HostProfile) -> dict[str, Any]:
    return p.to_dict()
