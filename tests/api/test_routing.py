"""Each router rules itself out with one regex (app/api/routing.py): the gate must match
exactly the paths some route of the router matches, or a call would miss its route (a 404
for a real path) or pay for routers it cannot reach."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.router import ROUTERS
from app.api.routing import ApiRouter, paths_regex

ROUTES = [route for r in ROUTERS for route in r.routes if isinstance(route, APIRoute)]
# The literal segments of the API's paths, and values a path parameter may take.
SEGMENTS = sorted({s for route in ROUTES for s in route.path.split("/") if s and "{" not in s})
VALUES = ["vm-0123abcd", "0", "7", "0x10", "snap-1", "x", "", "a%2Fb", "vcpus", "memslots"]


def sample(route: APIRoute, value: str = "1") -> str:
    return re.sub(r"\{[^}]+\}", value, route.path)


def test_every_router_is_gated() -> None:
    assert all(isinstance(r, ApiRouter) for r in ROUTERS)
    assert all(isinstance(r, ApiRouter) and r.gate() is not None for r in ROUTERS)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{sorted(r.methods)[0]} {r.path}")
def test_a_routes_own_path_passes_its_routers_gate(route: APIRoute) -> None:
    (router,) = [r for r in ROUTERS if route in r.routes]
    assert isinstance(router, ApiRouter)
    gate = router.gate()
    assert gate is not None and gate.match(sample(route))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS) | st.sampled_from(VALUES), min_size=0, max_size=7))
def test_a_gate_matches_exactly_what_its_routes_match(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    for router in ROUTERS:
        gate = paths_regex(router.routes)
        assert gate is not None
        expected = any(r.path_regex.match(path) for r in router.routes if isinstance(r, APIRoute))
        assert bool(gate.match(path)) == expected, (router.prefix, path)


async def test_a_route_of_a_late_router_and_a_wrong_method_still_route(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/vms", json={"name": "r"})
    vm = r.json()["id"]
    # The last routers of the app (tokens, stats descriptors) and a vCPU route: reached past
    # every router before them.
    assert (await client.get("/v1/stats/descriptors")).status_code == 200
    r = await client.post(f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": 0, "size": 4096})
    assert r.status_code == 200, r.text
    # A path that exists with another method: 405 naming the methods it has.
    r = await client.delete(f"/v1/vms/{vm}/vcpus/0/accesses")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # A path no router has: the problem 404.
    r = await client.get(f"/v1/vms/{vm}/vcpus/0/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem")
