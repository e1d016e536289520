"""Explicit zaps, zap events, the zap-policy experiment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.api.schemas.common import U64, Body, Open


class ZapRequest(Body):
    scope: Literal["all", "range"]
    gpa: U64 | None = None
    size: U64 | None = None
    roots: Literal["shared", "private", "both"]


class ZapEvent(Open):
    seq: int
    cause: str
    path: str


class ZapPolicy(Body):
    policy: Literal["kvm", "zap_all_shared_only"] = Field(
        description="`kvm`: what KVM does. `zap_all_shared_only`: NOT KVM — the design KVM "
        "rejected, kept to demonstrate its use-after-free."
    )
