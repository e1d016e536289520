"""`struct kvm_memory_attributes`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from app.api.schemas.common import U64, Answer, Body, flags_schema, flags_validator
from app.api.schemas.zaps import ZapEvent
from app.engine import uapi

_ATTRS = {"KVM_MEMORY_ATTRIBUTE_PRIVATE": uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE}
Attributes = Annotated[
    int,
    flags_validator(_ATTRS, 64),
    flags_schema(_ATTRS, 64, "KVM_MEMORY_ATTRIBUTE_* bits"),
]


class SetAttributes(Body):
    address: U64
    size: U64
    # Required: 0 converts the range to shared, which must be asked for, never implied.
    attributes: Attributes
    flags: U64 = 0


class AttributesResult(Answer):
    changed: bool = Field(description="false: the range already had these attributes.")
    zap: ZapEvent | None = Field(description="The zap of the view being left, if any.")


class AttributeRange(Answer):
    address: int
    size: int
    attributes: int
