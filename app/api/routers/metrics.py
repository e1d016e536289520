"""`GET /metrics`: Prometheus text format, one series per VM stat with a `vm` label.

Cumulative stats (events counted since the VM was created: TLB flushes, zaps, page faults,
refaults, …) are counters (`…_total`); stats that say how things are now (pages mapped by
size, page tables, roots, peaks) are gauges. Every live VM is reported, loaded in memory or
not: the service keeps each VM's stats on its row with every journaled call, so a scrape
never loads (replays) a VM nor waits for one's lock.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.api.deps import ServiceDep
from app.engine.stats import is_cumulative

router = APIRouter(tags=["metrics"])

_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class _Snapshot:
    """A one-shot collector over stats gathered before `generate_latest` runs."""

    def __init__(self, per_vm: dict[str, dict[str, Any]], loaded: int) -> None:
        self.per_vm = per_vm
        self.loaded = loaded

    def collect(self) -> Any:
        vms = GaugeMetricFamily("vkmmu_vms", "Live VMs (loaded in memory or not)")
        vms.add_metric([], len(self.per_vm))
        yield vms
        loaded = GaugeMetricFamily("vkmmu_vms_loaded", "VMs held in memory by this process")
        loaded.add_metric([], self.loaded)
        yield loaded
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for vm_id, stats in sorted(self.per_vm.items()):
            for name, value in sorted(_flatten(stats).items()):
                fam = families.get(name)
                if fam is None:
                    if is_cumulative(name):
                        # The client library appends `_total` to a counter's samples.
                        fam = CounterMetricFamily(
                            f"vkmmu_vm_{name}", f"KVM VM stat {name} (cumulative)", labels=["vm"]
                        )
                    else:
                        fam = GaugeMetricFamily(
                            f"vkmmu_vm_{name}", f"KVM VM stat {name}", labels=["vm"]
                        )
                    families[name] = fam
                fam.add_metric([vm_id], float(value))
        yield from families.values()


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in stats.items():
        name = _NAME_OK.sub("_", f"{prefix}{k}")
        if isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, int | float):
            out[name] = float(v)
        elif isinstance(v, dict):
            out.update(_flatten(v, f"{name}_"))
    return out


@router.get(
    "/metrics",
    summary="Prometheus metrics: every live VM's stats, labelled by VM id",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(service: ServiceDep) -> Response:
    per_vm = await service.stats_summaries()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(per_vm, len(service.loaded_vms())))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
