"""The VMM's own mapping of guest RAM (host virtual addresses)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from app.api.schemas.common import U64, Answer, Body, HexData
from app.api.schemas.zaps import ZapEvent


class HostRead(Body):
    userspace_addr: U64
    len: Annotated[U64, Field(description="Bytes; at most 1 MiB at once (else E2BIG).")]


class HostWrite(Body):
    userspace_addr: U64
    data: HexData


class HostDiscard(Body):
    userspace_addr: U64
    len: U64


class HostAdvise(Body):
    userspace_addr: U64
    len: U64
    advice: Literal["hugepage", "nohugepage"]


class HostMap(Body):
    userspace_addr: U64
    len: U64
    page_size: Literal[4096, 2097152, 1073741824]


class HostZap(Answer):
    zap: ZapEvent | None = Field(description="The MMU-notifier zap the call caused, if any.")


class HostAdvised(Answer):
    advice: Literal["hugepage", "nohugepage"] = Field(description="The advice now in force.")
