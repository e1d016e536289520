"""Routes are built before the first request (issue 12: no first-call penalty)."""

from __future__ import annotations

import fastapi.routing
import httpx
import pytest

from app.api.warmup import build_routes, built_routes


async def test_every_router_is_built_when_the_service_is_up(client: httpx.AsyncClient) -> None:
    app = client.app  # type: ignore[attr-defined]
    # FastAPI's included routers that build their routes on first use (none on versions
    # that build them eagerly): their version stamp is set once built. Read before anything
    # here could build them.
    lazy = [r for r in app.router.routes if callable(getattr(r, "effective_candidates", None))]
    assert all(getattr(r, "_effective_candidates_version", 0) is not None for r in lazy)
    openapi_ops = sum(len(ops) for ops in app.openapi()["paths"].values())
    assert build_routes(app) >= openapi_ops
    r = await client.get("/readyz")
    assert r.status_code == 200


def test_every_endpoint_has_its_error_context_before_its_first_request(
    client: httpx.AsyncClient,
) -> None:
    # FastAPI reads an endpoint's source (~1 ms) on its first request and caches it; the
    # warm-up fills that cache. Skipped on a FastAPI without the helper: nothing to warm.
    cache = getattr(fastapi.routing, "_endpoint_context_cache", None)
    if not isinstance(cache, dict):
        pytest.skip("this FastAPI has no endpoint context cache")
    app = client.app  # type: ignore[attr-defined]
    cache.clear()
    build_routes(app)
    # Route contexts of included routers and plain routes alike carry their dependant.
    dependants = [getattr(r, "dependant", None) for r in built_routes(app)]
    calls = [d.call for d in dependants if callable(getattr(d, "call", None))]
    assert len(calls) >= sum(len(ops) for ops in app.openapi()["paths"].values())
    assert all(id(call) in cache for call in calls)
