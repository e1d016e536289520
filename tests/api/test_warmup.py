"""Routes are built before the first request (issue 12: no first-call penalty)."""

from __future__ import annotations

import httpx

from app.api.warmup import build_routes


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
