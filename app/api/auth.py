"""Who is calling: bearer tokens, scopes, tenants, and the per-token request rate.

One dependency per router (`include_routers` adds it), never per route by hand:
- no `VKMMU_ADMIN_TOKEN`: the service is open, every caller acts as the admin;
- `Authorization: Bearer <token>`: the admin token, the metrics token (`/metrics` only), or
  a tenant token (`POST /v1/tokens`); anything else is 401 with `WWW-Authenticate: Bearer`;
- a token without the `write` scope gets 403 on a call that changes state;
- a tenant sees only its own VMs: a route naming another tenant's VM answers 404, exactly
  as for a VM that does not exist (no enumeration);
- a tenant token makes at most `VKMMU_TOKEN_RATE_PER_S` requests per second (429 with
  `Retry-After` past it).

The HTML pages (`/dashboard`, `/docs`, `/redoc`) also take the token from the `vkmmu_token`
cookie, so a browser can open them; the API itself never reads the cookie (no CSRF).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ApiProblem
from app.api.schemas.common import ID_PATTERN
from app.services.errors import VmNotFound
from app.services.quotas import acting_tenant
from app.services.tokens import TokenStore

Kind = Literal["open", "admin", "metrics", "tenant"]
COOKIE = "vkmmu_token"
# Calls that take a body but change nothing: a read-only token may make them.
READ_ONLY_POSTS = frozenset(
    {
        "/v1/vms/{vm}/what-if",
        "/v1/vms/{vm}/host-memory/read",
        "/v1/vms/{vm}/guest-memfds/{fd}/read",
    }
)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ID = re.compile(ID_PATTERN)

# Declares the scheme in the OpenAPI spec (and the Swagger UI's "Authorize" button); the
# checks are ours, so a missing header is not answered by FastAPI's own 403.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`VKMMU_ADMIN_TOKEN`, a tenant token (`POST /v1/tokens`), or for /metrics "
    "`VKMMU_METRICS_TOKEN`. Not needed when the service runs without an admin token.",
)


# Only there for the spec: `identify` reads the header itself.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Kind
    # None: sees every tenant (the admin, the open service, the metrics scraper).
    tenant: str | None
    scopes: frozenset[str]
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind in ("open", "admin")

    def sees(self, tenant: str | None) -> bool:
        return self.tenant is None or tenant == self.tenant


OPEN = Principal("open", None, frozenset({"read", "write"}))
ADMIN = Principal("admin", None, frozenset({"read", "write"}))
METRICS = Principal("metrics", None, frozenset({"metrics"}))


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts of up to `rate`."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        level, last = self._buckets.get(key, (self.rate, now))
        level = min(self.rate, level + (now - last) * self.rate)
        if level >= 1:
            self._buckets[key] = (level - 1, now)
            return 0.0
        self._buckets[key] = (level, now)
        return (1 - level) / self.rate


class StreamSlots:
    """Open event streams per tenant, against `VKMMU_TENANT_MAX_STREAMS`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str | None) -> None:
        if tenant is None:
            return
        n = self._open.get(tenant, 0)
        if n >= self.limit:
            raise ApiProblem(
                429,
                "Too Many Requests",
                f"the tenant has {n} event streams open, the most VKMMU_TENANT_MAX_STREAMS "
                "allows: close one first",
                "too-many-streams",
                headers={"Retry-After": "1"},
            )
        self._open[tenant] = n + 1

    def open(self, tenant: str) -> int:
        return self._open.get(tenant, 0)

    def release(self, tenant: str | None) -> None:
        if tenant is not None:
            self._open[tenant] = max(0, self._open.get(tenant, 0) - 1)


def unauthorized(detail: str, *, bad_token: bool) -> ApiProblem:
    challenge = 'Bearer realm="vkmmu"'
    if bad_token:
        challenge += ', error="invalid_token"'
    return ApiProblem(
        401, "Unauthorized", detail, "unauthorized", headers={"WWW-Authenticate": challenge}
    )


def forbidden(detail: str) -> ApiProblem:
    return ApiProblem(403, "Forbidden", detail, "forbidden")


def _bearer(request: Request, *, cookie: bool) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else ""
    if cookie:
        return request.cookies.get(COOKIE)
    return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


async def identify(request: Request, *, cookie: bool = False) -> Principal:
    """The caller, or 401. Also sets `request.state.principal`."""
    settings = request.app.state.settings
    if not settings.auth_enabled():
        principal = OPEN
    else:
        token = _bearer(request, cookie=cookie)
        if token is None:
            raise unauthorized("this call needs a bearer token", bad_token=False)
        principal = await _principal(request, token)
    request.state.principal = principal
    return principal


async def _principal(request: Request, token: str) -> Principal:
    settings = request.app.state.settings
    if token:
        if _same(token, settings.admin_token.get_secret_value()):
            return ADMIN
        metrics = settings.metrics_token
        if metrics is not None and metrics.get_secret_value():
            if _same(token, metrics.get_secret_value()):
                return METRICS
        store: TokenStore | None = getattr(request.app.state, "tokens", None)
        if store is not None:
            info = await asyncio.to_thread(store.verify, token)
            if info is not None:
                return Principal("tenant", info.tenant, frozenset(info.scopes), info.id)
    raise unauthorized("the bearer token is unknown, revoked or expired", bad_token=True)


def _changes_state(request: Request) -> bool:
    if request.method in _SAFE_METHODS:
        return False
    route = request.scope.get("route")
    return getattr(route, "path", None) not in READ_ONLY_POSTS


async def authorize(request: Request, _bearer: BearerDep = None) -> Principal:
    """The API's rule (every `/v1` router): identify, scope, rate, tenant of the VM."""
    principal = await identify(request)
    if principal.kind == "metrics":
        raise forbidden("the metrics token may read /metrics only")
    if _changes_state(request) and "write" not in principal.scopes:
        raise forbidden("this token is read-only (scope `read`): it cannot change state")
    if principal.token_id is not None:
        limiter: RateLimiter = request.app.state.rate_limiter
        wait = limiter.take(principal.token_id)
        if wait > 0:
            raise ApiProblem(
                429,
                "Too Many Requests",
                f"past {limiter.rate:g} requests per second for this token "
                "(VKMMU_TOKEN_RATE_PER_S)",
                "rate-limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    # Quotas of the service layer apply to what a tenant token asks for.
    acting_tenant.set(principal.tenant if principal.kind == "tenant" else None)
    vm = request.path_params.get("vm")
    if principal.tenant is not None and isinstance(vm, str) and _ID.match(vm):
        service = getattr(request.app.state, "service", None)
        if service is not None and not principal.sees(await service.vm_tenant(vm)):
            raise VmNotFound(vm)
    return principal


async def authorize_admin(request: Request, _bearer: BearerDep = None) -> Principal:
    """Token management: the admin only."""
    principal = await authorize(request)
    if not principal.is_admin:
        raise forbidden("only the admin token may manage tokens")
    return principal


async def authorize_metrics(request: Request, _bearer: BearerDep = None) -> Principal:
    """`/metrics`: the admin, the metrics token, or a tenant (its own VMs' series only)."""
    return await identify(request)


SIGN_IN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vkmmu: sign in</title></head>
<body style="font-family: sans-serif; margin: 3em">
<h1>vkmmu</h1>
<p>This page needs a token (the admin's or a tenant's). It is kept in a cookie of this site
and sent by the page as a bearer header.</p>
<form id="f"><input id="t" type="password" size="60" autofocus placeholder="token">
<button>Sign in</button></form>
<script>
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = "vkmmu_token=" + encodeURIComponent(document.getElementById("t").value) +
    "; path=/; SameSite=Strict" + secure;
  location.reload();
};
</script></body></html>
"""


async def authorize_page(request: Request) -> Principal:
    """The HTML pages: the API's rule, the token also from the `vkmmu_token` cookie; a
    browser without one gets a sign-in form (still a 401)."""
    try:
        principal = await identify(request, cookie=True)
    except ApiProblem as e:
        e.html = SIGN_IN_HTML
        raise
    if principal.kind == "metrics":
        raise forbidden("the metrics token may read /metrics only")
    return principal


def principal_of(request: Request) -> Principal:
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else OPEN


async def _principal_dep(request: Request) -> Principal:
    return principal_of(request)  # a coroutine: a plain `def` dependency costs a thread hop


PrincipalDep = Annotated[Principal, Depends(_principal_dep)]
