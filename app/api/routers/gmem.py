"""guest_memfd files: `KVM_CREATE_GUEST_MEMFD`, fallocate, close, read/write."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Response, status

from app.api.deps import Cursor, IfMatchDep, LimitQ, ServiceDep, VmId, mutate, paginate, query
from app.api.errors import (
    R_BODY,
    R_ETAG,
    R_ETAG_CREATED,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    R_QUERY,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.common import U32
from app.api.schemas.gmem import (
    Data,
    Fallocate,
    FallocateResult,
    GmemClosed,
    GmemCreate,
    GmemRead,
    GmemWrite,
    GuestMemfd,
    Written,
)
from app.api.schemas.pages import Page
from app.engine import ops

router = ApiRouter(prefix="/v1/vms/{vm}/guest-memfds", tags=["guest-memfds"])

Fd = Annotated[U32, Path(description="The guest_memfd's fd number.")]
_ERRORS = (R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION)
_MUTATION = responses(*_ERRORS, R_ETAG)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="KVM_CREATE_GUEST_MEMFD",
    responses=responses(*_ERRORS, R_ETAG_CREATED),
)
async def create_guest_memfd(
    vm: VmId, body: GmemCreate, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> GuestMemfd:
    result = await mutate(
        service, vm, ops.CreateGuestMemfd.from_json(body.model_dump()), if_match, response
    )
    return GuestMemfd.model_validate(result)


@router.get(
    "",
    summary="The VM's guest_memfd files, ordered by fd (closed ones too, marked `closed`)",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def list_guest_memfds(
    vm: VmId, service: ServiceDep, response: Response, limit: LimitQ = 100, cursor: Cursor = None
) -> Page[GuestMemfd]:
    items = await query(service, vm, lambda v: v.guest_memfds(), response)
    items = sorted(items, key=lambda g: g["fd"])
    return Page[GuestMemfd].model_validate(paginate(items, lambda g: g["fd"], limit, cursor))


@router.post(
    "/{fd}/fallocate",
    summary="fallocate(2) on the guest_memfd: allocate or punch a hole (zaps its mappings)",
    responses=_MUTATION,
)
async def fallocate_guest_memfd(
    vm: VmId,
    fd: Fd,
    body: Fallocate,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> FallocateResult:
    args = {"fd": fd, **body.model_dump()}
    result = await mutate(service, vm, ops.GmemFallocate.from_json(args), if_match, response)
    return FallocateResult.model_validate({"allocated": None, "freed": None} | result)


@router.delete(
    "/{fd}",
    summary="close(2): the last reference goes, KVM zaps every SPTE mapping its pages",
    responses=_MUTATION,
)
async def close_guest_memfd(
    vm: VmId, fd: Fd, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> GmemClosed:
    return GmemClosed.model_validate(
        await mutate(service, vm, ops.GmemClose.from_json({"fd": fd}), if_match, response)
    )


@router.post(
    "/{fd}/read",
    summary="Read through the mapping of an MMAP|INIT_SHARED guest_memfd",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_ETAG),
)
async def read_guest_memfd(
    vm: VmId, fd: Fd, body: GmemRead, service: ServiceDep, response: Response
) -> Data:
    result = await query(service, vm, lambda v: v.gmem_read(fd, body.offset, body.len), response)
    return Data.model_validate(result)


@router.post(
    "/{fd}/write",
    summary="Write through the mapping of an MMAP|INIT_SHARED guest_memfd",
    responses=_MUTATION,
)
async def write_guest_memfd(
    vm: VmId,
    fd: Fd,
    body: GmemWrite,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> Written:
    args = {"fd": fd, **body.model_dump()}
    return Written.model_validate(
        await mutate(service, vm, ops.GmemWrite.from_json(args), if_match, response)
    )
