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
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.input_limits import capped_issues
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
    state_changed: bool | None = Field(
        default=None,
        description="True when the call was rejected but still changed state, as the kernel's "
        "does: a memslot MOVE whose late check fails after the zap; a pre-fault that fails on "
        "its first page (its walk may have built tables or an MMIO SPTE); a TD instruction "
        "fetch from a shared GPA (KVM_BUG_ON: the VM dies, EIO). The call was journaled and "
        "the answer's ETag is the VM's new version. Absent otherwise.",
    )
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


def _etag_header(description: str) -> dict[str, Any]:
    return {"ETag": {"description": description, "schema": {"type": "string"}}}


R_PRECONDITION = {
    412: {
        **_problem_response(412, "If-Match does not match the VM's state version"),
        "headers": _etag_header("The VM's current state version, to retry against"),
    }
}
_ETAG = _etag_header(
    "The VM's state version this answer reflects (a strong entity tag); send it back in "
    "If-Match to apply a call only to that version"
)
# The success answer of a route about one VM carries its ETag (`deps.set_etag`).
R_ETAG = {200: {"headers": _ETAG}}
R_ETAG_CREATED = {201: {"headers": _ETAG}}
R_BODY = {
    413: _problem_response(413, "Request body too large"),
    422: _problem_response(422, "The body or a parameter is not the right shape"),
}
R_QUERY = {422: _problem_response(422, "A parameter is not the right shape")}
# Every route behind the API's rule (app/api/auth.py).
R_AUTH = {
    401: {
        **_problem_response(401, "No bearer token, or one that is unknown, revoked or expired"),
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: _problem_response(403, "The token may not make this call (read-only, metrics only)"),
    429: {
        **_problem_response(429, "Past the token's request rate or the tenant's streams"),
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        },
    },
}
# Any request at all, before any route: the request line and headers past
# VKMMU_MAX_HEADER_BYTES.
R_HEADERS = {
    431: _problem_response(431, "The request line and headers exceed VKMMU_MAX_HEADER_BYTES")
}
# Every route: a parameter may be malformed, the request line and headers may be too large
# (answered before any route, VKMMU_MAX_HEADER_BYTES), the database may be out (retry), and
# the service may fail.
R_COMMON = {
    422: _problem_response(422, "A parameter or the body is not the right shape"),
    **R_HEADERS,
    500: _problem_response(500, "Unexpected failure of the service"),
    503: {
        **_problem_response(503, "The database is unavailable; retry after `Retry-After`"),
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        },
    },
}
# Seconds a client should wait before retrying a call the database could not serve.
RETRY_AFTER_S = 1


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

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        kind: str,
        *,
        headers: dict[str, str] | None = None,
        html: str | None = None,
    ) -> None:
        super().__init__(detail)
        # An HTML page answered instead of the problem to a browser asking for one.
        self.html = html
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.headers = headers or {}


def kvm_problem(request: Request | None, exc: KvmError) -> JSONResponse:
    """A KVM rejection. One that still changed state (`state_changed`, e.g. a memslot MOVE
    whose late check failed after the zap) was journaled: it says so, with the new ETag."""
    from app.services.errors import attached_etag

    changed = bool(getattr(exc, "state_changed", False))
    resp = problem(
        request,
        errno_status(exc.errno),
        f"KVM rejected the call: {errno_name(exc.errno)}",
        exc.detail,
        "kvm-errno",
        errno=exc.errno,
        errno_name=errno_name(exc.errno),
        state_changed=True if changed else None,
    )
    tag = attached_etag(exc) if changed else None
    if tag is not None:
        resp.headers["ETag"] = tag
    return resp


def validation_problem(
    request: Request | None, issues: list[dict[str, Any]], detail: str | None = None
) -> JSONResponse:
    """The 422 of a request that is not the right shape, with each field at fault."""
    where = ", ".join(".".join(str(p) for p in i["loc"]) for i in issues[:5])
    return problem(
        request,
        422,
        "Request is not the right shape",
        detail or (f"invalid: {where}" if where else "invalid request"),
        "validation",
        **capped_issues(issues),
    )


def _jsonable_loc(loc: Any) -> list[str | int]:
    return [p if isinstance(p, int) else str(p) for p in loc]


def validation_issues(errors: Any) -> list[dict[str, Any]]:
    # Only loc/msg/type: the offending input is not echoed (it may be huge or hostile).
    return [
        {"loc": _jsonable_loc(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e["type"]}
        for e in errors
    ]


# RFC 9110's names where Python's HTTPStatus still has the older ones (3.11: "Request
# Entity Too Large"), so a 413 has one title whichever layer answers it.
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def _status_title(status: int) -> str:
    from http import HTTPStatus

    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# FastAPI answers a body its JSON reader could not even decode (not UTF-8, an integer over
# Python's digit limit, nesting over the recursion limit) with this 400; it is a malformed
# body like any other, so it becomes the same 422.
_BODY_PARSE_DETAIL = "There was an error parsing the body"


def _body_parse_issue(cause: BaseException | None) -> dict[str, Any]:
    if isinstance(cause, UnicodeError):
        msg = "the body is not valid UTF-8"
    elif isinstance(cause, RecursionError):
        msg = "the JSON body nests too deeply"
    elif isinstance(cause, ValueError) and "digit" in str(cause):
        msg = "a number in the body has too many digits"
    else:
        msg = "the body is not valid JSON"
    return {"loc": ["body"], "msg": msg, "type": "json_invalid"}


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (`include_routers` lists them)."""
    methods: set[str] = set()
    for regex, route_methods in getattr(request.app.state, "allowed_methods", ()):
        if regex.match(request.scope.get("path", "")):
            methods |= route_methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    # Imported here: the service layer may be absent in a bare API test.
    from app.services import errors as svc_errors

    async def on_kvm(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KvmError)
        return kvm_problem(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_problem(request, validation_issues(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_DETAIL:
            return validation_problem(request, [_body_parse_issue(exc.__cause__)])
        resp = problem(
            request,
            exc.status_code,
            _status_title(exc.status_code),
            str(exc.detail),
            f"http-{exc.status_code}",
        )
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            if allowed:
                resp.headers["Allow"] = ", ".join(allowed)
        return resp

    async def on_api_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiProblem)
        resp: Response
        if exc.html is not None and "text/html" in request.headers.get("accept", ""):
            resp = HTMLResponse(exc.html, status_code=exc.status)
        else:
            resp = problem(request, exc.status, exc.title, exc.detail, exc.kind)
        for k, v in exc.headers.items():
            resp.headers[k] = v
        return resp

    async def on_vm_not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem(request, 404, "No such VM", str(exc) or "VM not found", "vm-not-found")

    async def on_snapshot_not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            request, 404, "No such snapshot", str(exc) or "snapshot not found", "snapshot-not-found"
        )

    async def on_precondition(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, svc_errors.PreconditionFailed)
        resp = problem(
            request,
            412,
            "Precondition failed",
            str(exc) or "If-Match does not match the VM's state version",
            "precondition-failed",
        )
        # The version to retry against, without another GET.
        resp.headers["ETag"] = exc.current
        return resp

    async def on_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The reason (host names, driver messages) is in the service's log, not the answer.
        resp = problem(
            request,
            503,
            "Service Unavailable",
            "the database is unavailable; retry shortly",
            "unavailable",
        )
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp

    async def on_fork_mismatch(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, svc_errors.ForkMismatch)
        issues = [
            {
                "loc": ["body", name],
                "msg": f"a fork takes {name} from its snapshot: {src} there, {given} asked",
                "type": "fork_mismatch",
            }
            for name, (given, src) in exc.fields.items()
        ]
        return validation_problem(request, issues, detail=str(exc))

    app.add_exception_handler(KvmError, on_kvm)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ApiProblem, on_api_problem)
    app.add_exception_handler(svc_errors.VmNotFound, on_vm_not_found)
    app.add_exception_handler(svc_errors.SnapshotNotFound, on_snapshot_not_found)
    app.add_exception_handler(svc_errors.PreconditionFailed, on_precondition)
    app.add_exception_handler(svc_errors.ServiceUnavailable, on_unavailable)
    app.add_exception_handler(svc_errors.ForkMismatch, on_fork_mismatch)
