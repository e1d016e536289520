"""Tenant tokens (`/v1/tokens`): what the admin sends and what it gets back."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.api.schemas.common import Answer, Body
from app.services.tokens import TENANT_PATTERN

Scope = Literal["read", "write"]


class TokenCreate(Body):
    tenant: str = Field(
        pattern=TENANT_PATTERN,
        description="The tenant the token acts for: it sees and changes that tenant's VMs only.",
    )
    scopes: list[Scope] | None = Field(
        default=None,
        min_length=1,
        max_length=2,
        description='`["read"]`: a read-only token (403 on calls that change state). '
        'Default `["read", "write"]`.',
    )
    expires_at: datetime | None = Field(
        default=None, description="RFC 3339; the token is refused (401) from then on."
    )
    label: str | None = Field(default=None, max_length=100, description="A name for people.")


class TokenInfo(Answer):
    id: str = Field(description="Names the token in `GET` and `DELETE /v1/tokens/{token}`.")
    tenant: str
    scopes: list[Scope]
    label: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = Field(description="When it was revoked; null while usable.")


class TokenCreated(TokenInfo):
    token: str = Field(
        description="The bearer token. Shown this once: only a keyed hash of it is stored."
    )
