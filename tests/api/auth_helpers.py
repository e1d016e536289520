"""Apps with tokens turned on, and the tokens to call them with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from pydantic import SecretStr

ADMIN = "admin-secret-token"
METRICS = "metrics-secret-token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def secured(make_client: Callable[..., Any], **overrides: Any) -> httpx.AsyncClient:
    """A started app with an admin and a metrics token (a client that sends no token)."""
    return await make_client(  # type: ignore[no-any-return]
        admin_token=SecretStr(ADMIN), metrics_token=SecretStr(METRICS), **overrides
    )


async def issue(
    client: httpx.AsyncClient, tenant: str, scopes: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"tenant": tenant}
    if scopes is not None:
        body["scopes"] = scopes
    r = await client.post("/v1/tokens", json=body, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]
