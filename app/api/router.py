"""All routers of the API, in the order the OpenAPI spec lists them."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api.routers import (
    attributes,
    capabilities,
    dashboard,
    events,
    gmem,
    guest,
    health,
    host_memory,
    introspection,
    memslots,
    metrics,
    replay,
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
    replay.router,
    metrics.router,
    events.router,
    dashboard.router,
)


def include_routers(app: FastAPI) -> None:
    for r in ROUTERS:
        app.include_router(r)
    # For the `Allow` header of a 405: each route serves one method, and the router's own
    # 405 names only the first route whose path matched.
    allowed: dict[str, tuple[re.Pattern[str], set[str]]] = {}
    for r in ROUTERS:
        for route in r.routes:
            if isinstance(route, APIRoute):
                _, methods = allowed.setdefault(route.path, (route.path_regex, set()))
                methods.update(route.methods or ())
    app.state.allowed_methods = list(allowed.values())
