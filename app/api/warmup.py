"""Build every route before the first request.

FastAPI builds an included router's routes (dependants, response fields, handlers) lazily,
on the first request that walks past that router: the first call after a start paid
20–35 ms per router on its way, hundreds of ms in all. The lifespan builds them all
before the server accepts a request, so `/readyz` answering means they are built (with
each router's path gate, app/api/routing.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import fastapi.routing
from fastapi import FastAPI

from app.api.routing import ApiRouter

# FastAPI reads each endpoint's source file (inspect.getsourcelines, ~1 ms) on the first
# request to it, for the context of its error messages, and caches it. A private helper:
# when a FastAPI release drops it, routes are still built and only this cache stays cold.
_endpoint_context = getattr(fastapi.routing, "_extract_endpoint_context", None)


def built_routes(app: FastAPI) -> Iterator[Any]:
    """Every route of the app, building each included router's on the way (recursively)."""
    stack: list[Any] = list(app.router.routes)
    while stack:
        route = stack.pop()
        candidates = getattr(route, "effective_candidates", None)
        if not callable(candidates):
            yield route
            continue
        stack.extend(candidates())
        router = getattr(route, "original_router", None)
        if isinstance(router, ApiRouter):
            router.gate()
        low_priority = getattr(route, "effective_low_priority_routes", None)
        if callable(low_priority):
            low_priority()


def build_routes(app: FastAPI) -> int:
    """Build every route, and each endpoint's error context; the routes found."""
    routes = 0
    for route in built_routes(app):
        routes += 1
        call = getattr(getattr(route, "dependant", None), "call", None)
        if callable(_endpoint_context) and callable(call):
            _endpoint_context(call)
    return routes


async def warm_worker_threads() -> None:
    """The first call handed to a worker thread imports anyio's thread machinery."""
    await anyio.to_thread.run_sync(lambda: None)
