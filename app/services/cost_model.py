"""A cost model: what-if counts turned into an estimate of guest time on a real host.

Every constant carries its source (docs/cost-model.md). A cost nobody has published a
measurement for has no default (None): it is left out of the estimate, and the estimate
says so, rather than being made up. A caller may supply any cost per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cost:
    name: str
    counts: str  # which what-if count it multiplies
    default_ns: float | None
    source: str


# 128 GiB guest: write-protecting every leaf SPTE (clearing D-bits) when dirty logging
# starts took 460 ms on a Xeon Gold 6152 (commit 3c9bd4006b, "KVM: x86: enable dirty log
# gradually in small chunks", Jay Zhou, 2020): 460e6 ns / (128 GiB / 4 KiB) = 13.7 ns per
# leaf. A zap walks and rewrites the same leaves, so this stands in for the per-SPTE cost.
_ZAP_SOURCE = (
    "Linux commit 3c9bd4006b (Jay Zhou, 2020): 460 ms to write-protect every leaf SPTE of a "
    "128 GiB guest on a Xeon Gold 6152, i.e. 13.7 ns per 4 KiB leaf (a walk-and-rewrite of "
    "each leaf, used as the per-SPTE zap cost)"
)
# kvm@vger.kernel.org, 27 Apr 2021, Keqian Zhu's figures quoted in "Re: [RFC PATCH v2 2/2]
# KVM: x86: Not wr-protect huge page with init_all_set dirty log": `dirty_log_perf_test -i 5
# -v 16 -s anonymous`, "Populate memory time: 3.105203579s": each of 16 vCPUs first-touches
# its 1 GiB (the test's default then: 262,144 4 KiB pages) in parallel, so one vCPU took
# 3.105 s / 262,144 = 11.8 µs per EPT violation, host page allocation included.
_FAULT_SOURCE = (
    "kvm@vger.kernel.org, 2021-04-27, Keqian Zhu's dirty_log_perf_test -v 16 -s anonymous "
    "(quoted by Ben Gardon, 'Re: [RFC PATCH v2 2/2] KVM: x86: Not wr-protect huge page with "
    "init_all_set dirty log'): Populate memory time 3.105203579 s for 1 GiB per vCPU, i.e. "
    "11.8 µs per 4 KiB EPT violation including host page allocation and zeroing (an upper "
    "bound for a refault, whose host page is already there)"
)
_UNSOURCED = "no published measurement found: no default, not estimated unless supplied"

COSTS: tuple[Cost, ...] = (
    Cost("ept_violation", "faults", 3.105203579e9 / 262144, _FAULT_SOURCE),
    Cost("zap_per_spte", "sptes_zapped_total", 460e6 / (128 * 2**30 / 4096), _ZAP_SOURCE),
    Cost("tlb_flush", "tlb_flushes", None, _UNSOURCED),
    Cost("vcpu_kick", "vcpu_kicks", None, _UNSOURCED),
    Cost("root_rebuild", "roots_invalidated", None, _UNSOURCED),
    Cost("seamcall", "sept_operations_total", None, _UNSOURCED),
)
BY_NAME = {c.name: c for c in COSTS}


class CostError(ValueError):
    pass


def resolve(overrides: dict[str, float] | None) -> dict[str, float | None]:
    """The cost of each event in ns: the default, or the caller's."""
    out: dict[str, float | None] = {c.name: c.default_ns for c in COSTS}
    for name, value in (overrides or {}).items():
        if name not in BY_NAME:
            raise CostError(f"unknown cost {name!r}; known: {', '.join(BY_NAME)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise CostError(f"cost {name!r} must be a number of nanoseconds >= 0")
        out[name] = float(value)
    return out


def estimate(counts: dict[str, Any], costs: dict[str, float | None]) -> dict[str, Any]:
    """Estimated guest time (µs) by event; events without a cost are listed, not guessed."""
    terms: dict[str, float] = {}
    missing: list[str] = []
    for c in COSTS:
        per = costs.get(c.name)
        n = int(counts.get(c.counts, 0))
        if per is None:
            if n:
                missing.append(c.name)
            continue
        terms[c.name] = round(n * per / 1000.0, 3)
    return {
        "model": True,
        "total_us": round(sum(terms.values()), 3),
        "by_event_us": terms,
        "not_estimated": missing,
    }


def describe() -> list[dict[str, Any]]:
    return [
        {"name": c.name, "counts": c.counts, "default_ns": c.default_ns, "source": c.source}
        for c in COSTS
    ]
