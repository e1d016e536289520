"""`GET /metrics`: Prometheus text format, or OpenMetrics when the scraper asks for it.

What is exported and why is in docs/metrics.md; the metrics live in `app.api.mmu_metrics`.
A scrape reads the VM rows (each keeps its stats from its last journaled call), so it never
loads (replays) a VM nor waits for one's lock.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from app.api.auth import principal_of
from app.api.deps import get_service
from app.api.errors import R_HEADERS
from app.api.mmu_metrics import TABLE_BYTES, MmuMetrics
from app.api.routing import ApiRouter

router = ApiRouter(tags=["metrics"])


def wants_openmetrics(accept: str) -> bool:
    return "application/openmetrics-text" in accept


@router.get(
    "/metrics",
    summary="Prometheus metrics: zaps, refaults, present state, HTTP, and per-VM kernel stats",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text format (OpenMetrics if the Accept header asks)",
        },
        431: R_HEADERS[431],
    },
)
async def metrics(request: Request) -> Response:
    m: MmuMetrics = request.app.state.metrics
    service: Any = get_service(request)
    summaries = await service.vm_summaries()
    stats = await service.stats_summaries()
    tenant = principal_of(request).tenant
    if tenant is not None:
        # A tenant's scrape names its own VMs only (the aggregates carry no VM ids).
        mine = {vm_id for vm_id in summaries if service.tenant_of(vm_id) == tenant}
        unknown = [vm_id for vm_id in summaries if service.tenant_of(vm_id) is None]
        for vm_id in unknown:  # not seen by this process yet: one row read each, once
            if await service.vm_tenant(vm_id) == tenant:
                mine.add(vm_id)
        summaries = {k: v for k, v in summaries.items() if k in mine}
        stats = {k: v for k, v in stats.items() if k in mine}
    loaded = service.loaded_vms()
    engine = getattr(service, "engine", None)
    tables = 0
    if engine is not None:
        for vm in list(loaded.values()):
            tables += int(engine.tables_live(vm))
    # No await between these two lines: the scrape sees one consistent snapshot.
    m.set_scrape(summaries, stats, len(loaded), tables * TABLE_BYTES)
    if wants_openmetrics(request.headers.get("accept", "")):
        return Response(
            openmetrics.generate_latest(m.registry), media_type=openmetrics.CONTENT_TYPE_LATEST
        )
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
