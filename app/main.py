"""`create_app()`: the FastAPI application (routers, errors, middlewares, service lifespan)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api.auth import RateLimiter, StreamSlots
from app.api.docs import install_docs
from app.api.errors import install_error_handlers, problem_media_types
from app.api.http_metrics import HttpMetricsMiddleware
from app.api.log import configure_logging
from app.api.middleware import (
    BodyLimitMiddleware,
    InputLimitMiddleware,
    RequestContextMiddleware,
)
from app.api.mmu_metrics import MmuMetrics
from app.api.openapi_names import operation_id, sdk_friendly, token_optional
from app.api.router import include_routers
from app.api.warmup import build_routes, warm_worker_threads
from app.config import Settings
from app.services.tokens import TokenStore
from app.services.vms import tenant_quotas

API_DESCRIPTION = """\
vkmmu simulates the x86 MMU half of Linux KVM on an Intel host: VMs of the x86 VM types
such a host offers (`KVM_X86_DEFAULT_VM`, `KVM_X86_SW_PROTECTED_VM`, `KVM_X86_TDX_VM`),
memslots set exactly as `KVM_SET_USER_MEMORY_REGION2` sets them, quirks, guest page faults
that build real EPT page tables, and the zaps that tear them down. The AMD VM types
(`KVM_X86_SEV_VM`, `KVM_X86_SEV_ES_VM`, `KVM_X86_SNP_VM`) are known by name and number and
refused with `EINVAL`, as KVM_CREATE_VM refuses them on an Intel host.

Integers in requests may be JSON numbers or `"0x…"` strings; constants are accepted by
kernel name or number. A call KVM would reject answers `application/problem+json` with
`errno` and `errno_name`. Mutating calls answer an `ETag` (the VM's state version) and
honour `If-Match`.
"""


def create_app(settings: Settings | None = None, service: Any | None = None) -> FastAPI:
    """Build the app. `service` (a started-or-not VmService) overrides the one built from
    `settings`; the lifespan starts and stops whichever it holds."""
    settings = settings or Settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = app.state.service
        if svc is None:
            from app.services.vms import build_service, service_options

            svc = app.state.service = build_service(
                settings.database_url, **service_options(settings)
            )
        svc.events.queue_max = settings.events_queue_max
        svc.set_tenant_quotas(tenant_quotas(settings))
        secret = settings.token_secret
        app.state.tokens = TokenStore(
            lambda: svc.db, None if secret is None else secret.get_secret_value() or None
        )
        app.state.metrics.attach(svc.events, svc.budget_tables * 4096)
        build_routes(app)
        await warm_worker_threads()
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="vkmmu",
        version="1.0.0",
        summary="The KVM x86 MMU (memslots, TDP page tables, zaps, TDX), served over HTTP",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        generate_unique_id_function=operation_id,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = sdk_friendly(problem_media_types(FastAPI.openapi(app)))
            app.openapi_schema = spec if settings.auth_enabled() else token_optional(spec)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = MmuMetrics(max_vms=settings.metrics_max_vms)
    app.state.tokens = None  # a TokenStore once the service started (lifespan)
    app.state.rate_limiter = RateLimiter(settings.token_rate_per_s)
    app.state.stream_slots = StreamSlots(settings.tenant_max_streams)
    install_error_handlers(app)
    include_routers(app)
    install_docs(app)
    # Added last = outermost: the request id exists before the body limit answers.
    app.add_middleware(
        InputLimitMiddleware,
        max_header_bytes=settings.max_header_bytes,
        max_json_items=settings.max_json_items,
        max_json_depth=settings.max_json_depth,
    )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    origins = settings.cors_origin_list()
    if origins:
        # Outermost: a preflight is answered before anything else, and every answer (errors
        # and the zap event stream included) carries the CORS headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["ETag", "X-Request-ID", "Location", "Retry-After"],
        )
    return app
