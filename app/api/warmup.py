"""Build every route before the first request.

FastAPI builds an included router's routes (dependants, response fields, handlers) lazily,
on the first request that walks past that router: the first call after a start paid
20–35 ms per router on its way, hundreds of ms in all. The lifespan builds them all
before the server accepts a request, so `/readyz` answering means they are built (with
each router's path gate, app/api/routing.py).
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import FastAPI

from app.api.routing import ApiRouter


def build_routes(app: FastAPI) -> int:
    """Build the routes of every included router, recursively; the routes found."""
    routes = 0
    stack: list[Any] = list(app.router.routes)
    while stack:
        route = stack.pop()
        candidates = getattr(route, "effective_candidates", None)
        if not callable(candidates):
            routes += 1
            continue
        stack.extend(candidates())
        router = getattr(route, "original_router", None)
        if isinstance(router, ApiRouter):
            router.gate()
        low_priority = getattr(route, "effective_low_priority_routes", None)
        if callable(low_priority):
            low_priority()
    return routes


async def warm_worker_threads() -> None:
    """The first call handed to a worker thread imports anyio's thread machinery."""
    await anyio.to_thread.run_sync(lambda: None)
