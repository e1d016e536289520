"""A pure ASGI middleware counting HTTP requests and their latency by route template.

The route template (`/v1/vms/{vm}/memslots/{slot}`, never the concrete path) keeps the label
bounded; requests no route matched are `<unmatched>`. Latency runs to the end of the answer
(for a stream: until it ends).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.mmu_metrics import MmuMetrics

UNMATCHED = "<unmatched>"


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: MmuMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the answer started is a 500 to the client

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_http(
                scope.get("method", "GET"), _route(scope), status, time.perf_counter() - start
            )


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED
