"""Liveness and readiness."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field

from app.api.errors import PROBLEM_JSON, R_HEADERS, responses
from app.api.routing import ApiRouter
from app.api.schemas.common import Answer

log = logging.getLogger("vkmmu.health")

router = ApiRouter(tags=["health"])


class Health(Answer):
    status: Literal["ok"]


class Readiness(Answer):
    status: Literal["ready"]
    ok: bool = Field(description="The database answers and its schema is at Alembic's head.")
    loaded_vms: int = Field(description="VMs held in memory now.")
    database: str = Field(description="`ok`, or why not.")
    schema_: str = Field(alias="schema", description="`ok`, or the revision found and expected.")


@router.get("/healthz", summary="Liveness: the process answers", responses={431: R_HEADERS[431]})
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the VM service and its database answer",
    responses=responses(
        {503: {"description": "Not ready; `detail` says why", "content": {PROBLEM_JSON: {}}}}
    ),
)
async def readyz(request: Request) -> Any:
    service = getattr(request.app.state, "service", None)
    reason: str | None = None
    info: dict[str, Any] = {}
    if service is None:
        reason = "the VM service is not started"
    else:
        try:
            info = await service.ready()
        except Exception:  # readiness must answer, whatever the database does
            # The details (driver text: hosts, ports, names) go to the log, not the answer.
            log.exception("readiness check failed")
            reason = "database unavailable"
        else:
            if not info.get("ok", True):
                parts = []
                if info.get("database") not in (None, "ok"):
                    parts.append(f"database {info['database']}")
                if info.get("schema") not in (None, "ok"):
                    parts.append(f"schema: {info['schema']}")
                reason = "; ".join(parts) or "not ready"
    if reason is not None:
        return JSONResponse(
            {
                "type": "urn:vkmmu:problem:not-ready",
                "title": "Service Unavailable",
                "status": 503,
                "detail": reason,
                **{k: v for k, v in info.items() if k not in ("status", "detail")},
            },
            status_code=503,
            media_type=PROBLEM_JSON,
        )
    return Readiness.model_validate({"status": "ready", **info})
