"""All routers of the API, in the order the OpenAPI spec lists them."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.routers import (
    attributes,
    capabilities,
    gmem,
    guest,
    health,
    host_memory,
    introspection,
    memslots,
    metrics,
    snapshots,
    vms,
    zaps,
)

ROUTERS = (
    health.router,
    capabilities.router,
    vms.router,
    memslots.router,
    gmem.router,
    attributes.router,
    guest.router,
    host_memory.router,
    zaps.router,
    introspection.router,
    snapshots.router,
    metrics.router,
)


def include_routers(app: FastAPI) -> None:
    for r in ROUTERS:
        app.include_router(r)
