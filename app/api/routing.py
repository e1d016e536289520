"""`ApiRouter`: the APIRouter every router of the API is, ruling itself out cheaply.

The app tries its included routers in turn, and FastAPI matches each route of each router
through its own route contexts: ~15,000 instructions per route tried, so a call to the
seventh router paid ~600,000 instructions (a fifth of a no-op access) before its own
router was reached. A router first asks one regex made of its routes' path regexes (all
a route needs to match, fully or partially for a 405) and answers NONE at once when it
does not match.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.routing import Match
from starlette.types import Scope

# Starlette names each path parameter's group; alternatives of one regex cannot share names.
_NAMED_GROUP = re.compile(r"\(\?P<\w+>")


def paths_regex(routes: list[Any]) -> re.Pattern[str] | None:
    """One regex matching what any of `routes`' path regexes matches (None: a route that is
    not an APIRoute, which matches by rules of its own)."""
    if not all(isinstance(r, APIRoute) for r in routes):
        return None
    patterns = dict.fromkeys(_NAMED_GROUP.sub("(?:", r.path_regex.pattern) for r in routes)
    return re.compile("|".join(f"(?:{p})" for p in patterns))


class ApiRouter(APIRouter):
    """An APIRouter included without a prefix (app/api/router.py), so its routes' own path
    regexes are the ones FastAPI matches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate: tuple[int, re.Pattern[str] | None] = (-1, None)

    def gate(self) -> re.Pattern[str] | None:
        """`paths_regex` of its routes, built once (at startup: app/api/warmup.py) and again
        if a route is added."""
        count, gate = self._gate
        if count != len(self.routes):
            gate = paths_regex(self.routes)
            self._gate = (len(self.routes), gate)
        return gate

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            gate = self.gate()
            if gate is not None and not gate.match(get_route_path(scope)):
                return Match.NONE, {}
        return super().matches(scope)
