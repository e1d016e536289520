"""The VMM's own mapping of guest RAM: read, write, madvise, hugetlb mmap."""

from __future__ import annotations

from fastapi import Response

from app.api.deps import IfMatchDep, ServiceDep, VmId, mutate, query
from app.api.errors import R_BODY, R_ETAG, R_KVM, R_NOT_FOUND, R_PRECONDITION, responses
from app.api.routing import ApiRouter
from app.api.schemas.gmem import Data, Written
from app.api.schemas.host_memory import (
    HostAdvise,
    HostAdvised,
    HostDiscard,
    HostMap,
    HostRead,
    HostWrite,
    HostZap,
)
from app.engine import ops

router = ApiRouter(prefix="/v1/vms/{vm}/host-memory", tags=["host-memory"])
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG)


@router.post(
    "/read",
    summary="Read host memory at an HVA (what the VMM sees)",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_ETAG),
)
async def read_host_memory(
    vm: VmId, body: HostRead, service: ServiceDep, response: Response
) -> Data:
    result = await query(
        service, vm, lambda v: v.host_read(body.userspace_addr, body.len), response
    )
    return Data.model_validate(result)


@router.post("/write", summary="Write host memory at an HVA", responses=_MUTATION)
async def write_host_memory(
    vm: VmId, body: HostWrite, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> Written:
    return Written.model_validate(
        await mutate(service, vm, ops.HostWrite.from_json(body.model_dump()), if_match, response)
    )


@router.post(
    "/discard",
    summary="madvise(MADV_DONTNEED): frees the pages; the MMU notifier zaps their SPTEs",
    responses=_MUTATION,
)
async def discard_host_memory(
    vm: VmId, body: HostDiscard, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> HostZap:
    return HostZap.model_validate(
        await mutate(service, vm, ops.HostDiscard.from_json(body.model_dump()), if_match, response)
    )


@router.post(
    "/advise",
    summary="madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE): THP for an HVA range",
    responses=_MUTATION,
)
async def advise_host_memory(
    vm: VmId, body: HostAdvise, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> HostAdvised:
    await mutate(service, vm, ops.HostAdvise.from_json(body.model_dump()), if_match, response)
    return HostAdvised(advice=body.advice)


@router.post(
    "/map",
    summary="mmap of hugetlbfs: the host page size behind an HVA range",
    responses=_MUTATION,
)
async def map_host_memory(
    vm: VmId, body: HostMap, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> HostZap:
    return HostZap.model_validate(
        await mutate(service, vm, ops.HostMap.from_json(body.model_dump()), if_match, response)
    )
