"""RFC 9457 problem details: one mapping from every error the lower layers raise to HTTP.

The engine raises exactly one exception type, `KvmError`, carrying the errno the ioctl would
set; the HTTP status is derived from the errno here and nowhere else, so a client can rely on
`errno`/`errno_name` and the status agreeing across every route.
"""

from __future__ import annotations

import errno as _errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import KvmError

log = logging.getLogger("vkmmu.api")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "urn:vkmmu:problem:"

# The status a KVM rejection maps to (api-contract.md, "Errors"). An errno not listed is a
# plain client error: the ioctl refused the call, the service did not fail.
ERRNO_STATUS: dict[int, int] = {
    _errno.EINVAL: 400,
    _errno.EFAULT: 400,
    _errno.E2BIG: 400,
    _errno.EOPNOTSUPP: 400,
    _errno.EBADF: 400,
    _errno.EPERM: 403,
    _errno.EACCES: 403,
    _errno.ENOENT: 404,
    _errno.ENXIO: 404,
    _errno.EEXIST: 409,
    _errno.EBUSY: 409,
    _errno.ENOMEM: 507,
}


# Python's errorcode picks the userspace alias for a few numbers shared by two names; a
# KVM user expects the kernel's name.
_KERNEL_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EDEADLK: "EDEADLK"}


def errno_status(errno: int) -> int:
    return ERRNO_STATUS.get(errno, 400)


def errno_name(errno: int) -> str:
    return _KERNEL_ERRNO_NAMES.get(errno) or _errno.errorcode.get(errno, str(errno))


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where the bad value is, e.g. ['body', 'flags'].")
    msg: str
    type: str


class Problem(BaseModel):
    """An `application/problem+json` body (RFC 9457)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI naming the kind of problem.")
    title: str
    status: int
    detail: str
    instance: str | None = Field(default=None, description="The request path.")
    request_id: str | None = None
    errno: int | None = Field(
        default=None, description="The errno KVM would set, for a call KVM would reject."
    )
    errno_name: str | None = Field(default=None, description='e.g. "EINVAL".')
    errors: list[ValidationIssue] | None = Field(
        default=None, description="For 422: each field at fault."
    )


def _problem_response(status: int, description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description, "content": {PROBLEM_JSON: {}}}


# `responses=` fragments for routers, so the OpenAPI spec (and generated SDKs) know the body
# of every error a route can answer.
R_KVM = {
    400: _problem_response(400, "KVM rejected the call (EINVAL, EFAULT, E2BIG, EOPNOTSUPP, EBADF)"),
    403: _problem_response(403, "KVM rejected the call (EPERM, EACCES)"),
    409: _problem_response(409, "KVM rejected the call (EEXIST, EBUSY)"),
    507: _problem_response(507, "A limit of the service was reached (ENOMEM)"),
}
R_NOT_FOUND = {404: _problem_response(404, "No such VM or object (or ENOENT/ENXIO from KVM)")}
R_PRECONDITION = {412: _problem_response(412, "If-Match does not match the VM's state version")}
R_BODY = {
    413: _problem_response(413, "Request body too large"),
    422: _problem_response(422, "The body or a parameter is not the right shape"),
}
R_QUERY = {422: _problem_response(422, "A parameter is not the right shape")}
# Every route: a parameter may be malformed, and the service may fail.
R_COMMON = {
    422: _problem_response(422, "A parameter or the body is not the right shape"),
    500: _problem_response(500, "Unexpected failure of the service"),
}


def responses(*parts: dict[int, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for part in (R_COMMON, *parts):
        for status, spec in part.items():
            out[status] = spec
    return out


def problem_media_types(spec: dict[str, Any]) -> dict[str, Any]:
    """FastAPI files a response `model` under application/json; error bodies are
    application/problem+json, so move their schema there (in place; returns `spec`)."""
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            for code, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                if code[:1] in "45" and PROBLEM_JSON in content and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    return spec


def problem(
    request: Request | None,
    status: int,
    title: str,
    detail: str,
    kind: str,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
        rid = getattr(request.state, "request_id", None)
        if rid:
            body["request_id"] = rid
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


class ApiProblem(Exception):
    """An error the API layer itself raises (bad cursor, not found, …)."""

    def __init__(self, status: int, title: str, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind


def kvm_problem(request: Request | None, exc: KvmError) -> JSONResponse:
    return problem(
        request,
        errno_status(exc.errno),
        f"KVM rejected the call: {errno_name(exc.errno)}",
        exc.detail,
        "kvm-errno",
        errno=exc.errno,
        errno_name=errno_name(exc.errno),
    )


def _jsonable_loc(loc: Any) -> list[str | int]:
    return [p if isinstance(p, int) else str(p) for p in loc]


def validation_issues(errors: Any) -> list[dict[str, Any]]:
    # Only loc/msg/type: the offending input is not echoed (it may be huge or hostile).
    return [
        {"loc": _jsonable_loc(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e["type"]}
        for e in errors
    ]


def _status_title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install_error_handlers(app: FastAPI) -> None:
    # Imported here: the service layer may be absent in a bare API test.
    from app.services import errors as svc_errors

    async def on_kvm(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KvmError)
        return kvm_problem(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        issues = validation_issues(exc.errors())
        where = ", ".join(".".join(str(p) for p in i["loc"]) for i in issues[:5])
        return problem(
            request,
            422,
            "Request is not the right shape",
            f"invalid: {where}" if where else "invalid request",
            "validation",
            errors=issues,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        resp = problem(
            request,
            exc.status_code,
            _status_title(exc.status_code),
            str(exc.detail),
            f"http-{exc.status_code}",
        )
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    async def on_api_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        return problem(request, exc.status, exc.title, exc.detail, exc.kind)

    async def on_vm_not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem(request, 404, "No such VM", str(exc) or "VM not found", "vm-not-found")

    async def on_snapshot_not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            request, 404, "No such snapshot", str(exc) or "snapshot not found", "snapshot-not-found"
        )

    async def on_precondition(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            request,
            412,
            "Precondition failed",
            str(exc) or "If-Match does not match the VM's state version",
            "precondition-failed",
        )

    app.add_exception_handler(KvmError, on_kvm)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ApiProblem, on_api_problem)
    app.add_exception_handler(svc_errors.VmNotFound, on_vm_not_found)
    app.add_exception_handler(svc_errors.SnapshotNotFound, on_snapshot_not_found)
    app.add_exception_handler(svc_errors.PreconditionFailed, on_precondition)
