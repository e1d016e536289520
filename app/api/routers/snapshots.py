"""Snapshots: take, list, get, delete, restore (fork = `POST /v1/vms {"from_snapshot": id}`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Response, status

from app.api.deps import (
    IfMatchDep,
    LimitQ,
    ServiceDep,
    SnapshotCursor,
    VmId,
    paginate,
    set_etag,
)
from app.api.errors import (
    R_ETAG,
    R_ETAG_CREATED,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    R_QUERY,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.common import ID_PATTERN
from app.api.schemas.pages import Page
from app.api.schemas.snapshots import Snapshot, SnapshotCreate
from app.api.schemas.vms import VmInfo

router = ApiRouter(prefix="/v1/vms/{vm}/snapshots", tags=["snapshots"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Snapshot the VM's state now",
    description="A snapshot does not move the VM's version: the ETag is the version captured. "
    "A VM keeps at most `VKMMU_MAX_MANUAL_SNAPSHOTS` of them (ENOMEM, 507, past it).",
    responses=responses(R_NOT_FOUND, R_KVM, R_ETAG_CREATED),
)
async def create_snapshot(
    vm: VmId, service: ServiceDep, response: Response, body: SnapshotCreate | None = None
) -> Snapshot:
    info = await service.create_snapshot(vm, label=None if body is None else body.label)
    # `seq` is the journal record the snapshot holds the state after: the VM's version then
    # (taken under the VM lock, so no call moved it in between).
    seq = info.get("seq")
    if isinstance(seq, int):
        set_etag(response, str(seq))
    return Snapshot.model_validate(info)


@router.get(
    "", summary="The VM's snapshots, ordered by id", responses=responses(R_NOT_FOUND, R_QUERY)
)
async def list_snapshots(
    vm: VmId, service: ServiceDep, limit: LimitQ = 100, cursor: SnapshotCursor = None
) -> Page[Snapshot]:
    items = sorted(await service.list_snapshots(vm), key=lambda s: s["id"])
    return Page[Snapshot].model_validate(paginate(items, lambda s: s["id"], limit, cursor))


SnapshotId = Annotated[str, Path(pattern=ID_PATTERN, description="The snapshot id.")]


@router.get(
    "/{snapshot}",
    summary="One of the VM's snapshots",
    description="The ETag is the VM version the snapshot captured (as when it was taken).",
    responses=responses(R_NOT_FOUND, R_ETAG),
)
async def get_snapshot(
    vm: VmId, snapshot: SnapshotId, service: ServiceDep, response: Response
) -> Snapshot:
    info = await service.get_snapshot(vm, snapshot)
    seq = info.get("seq")
    if isinstance(seq, int):
        set_etag(response, str(seq))
    return Snapshot.model_validate(info)


@router.delete(
    "/{snapshot}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one of the VM's snapshots",
    description="EBUSY (409) when the VM's state can no longer be rebuilt without it (the "
    "journal before it was pruned) or a fork still starts from it.",
    responses=responses(R_NOT_FOUND, R_KVM, {204: {"headers": R_ETAG[200]["headers"]}}),
)
async def delete_snapshot(vm: VmId, snapshot: SnapshotId, service: ServiceDep) -> Response:
    # Deleting a snapshot does not move the VM's version: the ETag is the current one.
    tag = await service.delete_snapshot(vm, snapshot)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.headers["ETag"] = tag
    return response


@router.post(
    "/{snapshot}/restore",
    summary="Put the VM back in the snapshot's state",
    responses=responses(R_NOT_FOUND, R_KVM, R_PRECONDITION, R_ETAG),
)
async def restore_snapshot(
    vm: VmId,
    snapshot: SnapshotId,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> VmInfo:
    info, etag = await service.restore_snapshot(vm, snapshot, if_match=if_match)
    set_etag(response, etag)
    return VmInfo.model_validate(info)
