"""`GET /metrics`: Prometheus text format, one series per VM stat with a `vm` label."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from app.api.deps import ServiceDep, VmServiceLike

router = APIRouter(tags=["metrics"])

_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


async def _loaded_vm_ids(service: VmServiceLike) -> list[str]:
    # Only VMs the service already holds in memory: a scrape must never load (replay) a VM.
    loaded = getattr(service, "loaded_vms", None)
    if loaded is not None:
        return sorted(loaded())
    out: list[str] = []
    cursor: str | None = None
    while True:
        items, cursor = await service.list_vms(limit=1000, cursor=cursor)
        out.extend(str(i["id"]) for i in items if i.get("loaded", True))
        if cursor is None:
            return out


class _Snapshot:
    """A one-shot collector over stats gathered before `generate_latest` runs."""

    def __init__(self, per_vm: dict[str, dict[str, Any]]) -> None:
        self.per_vm = per_vm

    def collect(self) -> Any:
        families: dict[str, GaugeMetricFamily] = {}
        vms = GaugeMetricFamily("vkmmu_vms_loaded", "VMs held in memory by this process")
        vms.add_metric([], len(self.per_vm))
        yield vms
        for vm_id, stats in sorted(self.per_vm.items()):
            for name, value in sorted(_flatten(stats).items()):
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(
                        f"vkmmu_vm_{name}", f"KVM VM stat {name}", labels=["vm"]
                    )
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
    summary="Prometheus metrics: the stats of every loaded VM, labelled by VM id",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request, service: ServiceDep) -> Response:
    from app.services.errors import VmNotFound

    per_vm: dict[str, dict[str, Any]] = {}
    for vm_id in await _loaded_vm_ids(service):
        try:
            stats, _ = await service.read(vm_id, lambda v: v.stats())
        except VmNotFound:
            continue  # deleted while we scraped
        per_vm[vm_id] = stats
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(per_vm))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
