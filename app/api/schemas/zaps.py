"""Explicit zaps, zap events, the zap-policy experiment."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from app.api.schemas.common import U64, Body, Open


class ZapRequest(Body):
    scope: Literal["all", "range"]
    # Validated even when left out, so that `range` can require them by name (422 naming
    # body.gpa / body.size rather than a bare EINVAL); `all` zaps everything and needs neither.
    gpa: Annotated[
        U64 | None, Field(validate_default=True, description="Required when scope is range.")
    ] = None
    size: Annotated[
        U64 | None, Field(validate_default=True, description="Required when scope is range.")
    ] = None
    roots: Literal["shared", "private", "both"]

    @field_validator("gpa", "size")
    @classmethod
    def _required_for_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("scope") == "range":
            raise ValueError(f"{info.field_name} is required when scope is 'range'")
        return value


class ZapEvent(Open):
    seq: int
    cause: str
    path: str


class ZapPolicy(Body):
    policy: Literal["kvm", "zap_all_shared_only"] = Field(
        description="`kvm`: what KVM does. `zap_all_shared_only`: NOT KVM — the design KVM "
        "rejected, kept to demonstrate its use-after-free."
    )
