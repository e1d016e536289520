"""`KVM_SET_MEMORY_ATTRIBUTES` and the attribute ranges it leaves."""

from __future__ import annotations

from fastapi import Response

from app.api.deps import Cursor, IfMatchDep, LimitQ, ServiceDep, VmId, mutate, paginate, query
from app.api.errors import (
    R_BODY,
    R_ETAG,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    R_QUERY,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.attributes import AttributeRange, AttributesResult, SetAttributes
from app.api.schemas.pages import Page
from app.engine import ops

router = ApiRouter(prefix="/v1/vms/{vm}/memory-attributes", tags=["memory-attributes"])


@router.post(
    "",
    summary="KVM_SET_MEMORY_ATTRIBUTES (a conversion zaps the view being left)",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG),
)
async def set_memory_attributes(
    vm: VmId, body: SetAttributes, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> AttributesResult:
    result = await mutate(
        service, vm, ops.SetMemoryAttributes.from_json(body.model_dump()), if_match, response
    )
    return AttributesResult.model_validate(result)


@router.get(
    "",
    summary="Ranges with non-zero attributes, ordered by address",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def get_memory_attributes(
    vm: VmId, service: ServiceDep, response: Response, limit: LimitQ = 100, cursor: Cursor = None
) -> Page[AttributeRange]:
    items = await query(service, vm, lambda v: v.memory_attributes(), response)
    items = sorted(items, key=lambda r: r["address"])
    return Page[AttributeRange].model_validate(
        paginate(items, lambda r: r["address"], limit, cursor)
    )
