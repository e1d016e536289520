"""`/v1/tokens`: the admin issues, lists and revokes tenant tokens (README "Security model")."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Path, Query, Request, status

from app.api.deps import LimitQ, paginate
from app.api.errors import R_BODY, R_NOT_FOUND, R_QUERY, ApiProblem, responses
from app.api.routing import ApiRouter
from app.api.schemas.pages import Page
from app.api.schemas.tokens import TokenCreate, TokenCreated, TokenInfo
from app.services.tokens import TENANT_PATTERN, TokenError, TokenStore

router = ApiRouter(prefix="/v1/tokens", tags=["tokens"])

TokenId = Annotated[str, Path(description="The token's id.", pattern=r"^tok-[0-9a-f]{1,64}$")]
TokenCursor = Annotated[
    str | None,
    Query(pattern=r"^tok-[0-9a-f]{1,64}$", description="`next_cursor` of the previous page."),
]
TenantQ = Annotated[str | None, Query(pattern=TENANT_PATTERN, description="One tenant only.")]


def _store(request: Request) -> TokenStore:
    store: TokenStore | None = getattr(request.app.state, "tokens", None)
    if store is None:
        raise ApiProblem(503, "Service Unavailable", "the service is not started", "unavailable")
    return store


def _not_found(token_id: str) -> ApiProblem:
    return ApiProblem(404, "No such token", f"no token with id {token_id!r}", "token-not-found")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Issue a tenant token (admin only); the token is in this answer only",
    responses=responses(R_BODY),
)
async def create_token(body: TokenCreate, request: Request) -> TokenCreated:
    store = _store(request)
    try:
        info, token = await asyncio.to_thread(
            store.create,
            body.tenant,
            scopes=body.scopes,
            expires_at=body.expires_at,
            label=body.label,
        )
    except TokenError as e:
        raise ApiProblem(422, "Unprocessable Content", str(e), "validation") from None
    return TokenCreated.model_validate({**info.to_json(), "token": token})


@router.get("", summary="Tenant tokens, ordered by id (admin only)", responses=responses(R_QUERY))
async def list_tokens(
    request: Request, limit: LimitQ = 100, cursor: TokenCursor = None, tenant: TenantQ = None
) -> Page[TokenInfo]:
    items = [t.to_json() for t in await asyncio.to_thread(_store(request).list, tenant=tenant)]
    page = paginate(items, lambda t: t["id"], limit, cursor)
    return Page[TokenInfo].model_validate(page)


@router.get("/{token}", summary="One tenant token (admin only)", responses=responses(R_NOT_FOUND))
async def get_token(token: TokenId, request: Request) -> TokenInfo:
    info = await asyncio.to_thread(_store(request).get, token)
    if info is None:
        raise _not_found(token)
    return TokenInfo.model_validate(info.to_json())


@router.delete(
    "/{token}",
    summary="Revoke a tenant token (admin only; revoking twice is no error)",
    description="Calls with the token are refused (401) from then on; in other processes "
    "sharing the database within 5 seconds.",
    responses=responses(R_NOT_FOUND),
)
async def revoke_token(token: TokenId, request: Request) -> TokenInfo:
    info = await asyncio.to_thread(_store(request).revoke, token)
    if info is None:
        raise _not_found(token)
    return TokenInfo.model_validate(info.to_json())
