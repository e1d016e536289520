"""All routers of the API, in the order the OpenAPI spec lists them."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from app.api.auth import (
    BearerDep,
    Principal,
    authorize,
    authorize_admin,
    authorize_metrics,
    authorize_page,
)
from app.api.errors import R_AUTH
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
    tdx,
    tokens,
    trace,
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
    tdx.router,
    host_memory.router,
    zaps.router,
    trace.router,
    introspection.router,
    introspection.descriptors_router,
    snapshots.router,
    replay.router,
    metrics.router,
    events.router,
    dashboard.router,
    tokens.router,
)
# Who may call what (app/api/auth.py): one dependency per router. Health stays open.
_AUTH = (
    (metrics.router, authorize_metrics),
    (dashboard.router, authorize_page),
    (tokens.router, authorize_admin),
)
_OPEN = (health.router,)


# The operational routes keep their own rules (a scraper may add parameters of its own).
_STRICT_QUERY = tuple(r for r in ROUTERS if r not in (health.router, metrics.router))


def _query_names(dependant: Dependant) -> frozenset[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def reject_unknown_query(request: Request) -> None:
    """An unknown query parameter is a 422, as an unknown body field is: `?limt=5` must
    not silently mean the default."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    known = _query_names(route.dependant)
    unknown = sorted({k for k in request.query_params if k not in known})
    takes = ", ".join(sorted(known)) or "none"
    if unknown:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"unknown query parameter; this route takes: {takes}",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


def _guard(r: APIRouter) -> Callable[..., Awaitable[Principal]]:
    """The router's one dependency: who may call it (app/api/auth.py), then, where its query
    is strict, unknown query parameters. One, not two: each dependency FastAPI solves costs
    a call ~65,000 instructions."""
    rule = next((dep for router, dep in _AUTH if router is r), authorize)
    if r not in _STRICT_QUERY:
        return rule

    async def checked(request: Request) -> Principal:
        principal = await rule(request)
        reject_unknown_query(request)
        return principal

    if rule is authorize_page:  # the pages take their token from a cookie too: no bearer
        return checked

    async def guard(request: Request, _bearer: BearerDep = None) -> Principal:
        return await checked(request)

    return guard


def include_routers(app: FastAPI) -> None:
    for r in ROUTERS:
        deps = [] if r in _OPEN else [Depends(_guard(r))]
        extra: dict[int | str, dict[str, Any]] = {} if r in _OPEN else dict(R_AUTH.items())
        app.include_router(r, dependencies=deps, responses=extra)
    # For the `Allow` header of a 405: each route serves one method, and the router's own
    # 405 names only the first route whose path matched.
    allowed: dict[str, tuple[re.Pattern[str], set[str]]] = {}
    for r in ROUTERS:
        for route in r.routes:
            if isinstance(route, APIRoute):
                _, methods = allowed.setdefault(route.path, (route.path_regex, set()))
                methods.update(route.methods or ())
    app.state.allowed_methods = list(allowed.values())
