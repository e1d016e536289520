"""Memslots: `KVM_SET_USER_MEMORY_REGION2`, listing, dirty logging."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import Path, Request, Response
from fastapi.exceptions import RequestValidationError

from app.api.deps import (
    Cursor,
    IfMatchDep,
    LimitQ,
    ServiceDep,
    VmId,
    mutate,
    paginate,
    query,
    set_etag,
)
from app.api.errors import (
    R_BODY,
    R_ETAG,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    R_QUERY,
    ApiProblem,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.common import U32
from app.api.schemas.memslots import (
    DirtyLog,
    DirtyLogClear,
    DirtyLogCleared,
    MemoryRegion,
    Memslot,
    MemslotBatch,
    MemslotBatchResult,
    MemslotChange,
)
from app.api.schemas.pages import Page
from app.engine import KvmError, ops

router = ApiRouter(prefix="/v1/vms/{vm}/memslots", tags=["memslots"])

Slot = Annotated[
    U32,
    Path(description="The kernel's 32-bit `slot`: `as_id << 16 | id` (decimal or 0x…)."),
]
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG)


@router.put(
    "/{slot}",
    summary="KVM_SET_USER_MEMORY_REGION2: create, move, change flags or (memory_size 0) delete",
    responses=_MUTATION,
)
async def set_memslot(
    vm: VmId,
    slot: Slot,
    body: MemoryRegion,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> MemslotChange:
    if body.slot is not None and body.slot != slot:
        raise ApiProblem(
            422, "Slot mismatch", "body `slot` differs from the slot in the path", "validation"
        )
    args = body.engine_args(slot)
    result = await mutate(service, vm, ops.SetUserMemoryRegion.from_json(args), if_match, response)
    return MemslotChange.model_validate(result)


@router.post(
    "/batch",
    summary="Many KVM_SET_USER_MEMORY_REGION2 calls in order, in one transaction, stopping at "
    "the first rejected one",
    description="Each region is applied exactly as `PUT …/memslots/{slot}` would apply it, in "
    "order, under the VM's lock and in one database transaction; the first call KVM rejects "
    "ends the batch (`rejected` with its errno), the rest are `not_attempted`. What is left "
    "is what the same ioctls issued one by one would leave: each applied call is its own "
    "journal record and publishes its events. The answer is 200 whatever the outcomes; the "
    "ETag is the VM's version after the batch. At most `VKMMU_MAX_BATCH` regions (422 past).",
    responses=_MUTATION,
    response_model=MemslotBatchResult,
)
async def batch_memslots(
    vm: VmId,
    body: MemslotBatch,
    request: Request,
    service: ServiceDep,
    if_match: IfMatchDep,
) -> Response:
    limit = request.app.state.settings.max_batch
    if len(body.regions) > limit:
        msg = f"at most {limit} regions in one batch (VKMMU_MAX_BATCH); got {len(body.regions)}"
        raise RequestValidationError([{"loc": ("body", "regions"), "msg": msg, "type": "too_long"}])
    calls = [(ops.SetUserMemoryRegion.NAME, r.engine_args(r.slot)) for r in body.regions]
    outcomes, tag = await service.mutate_batch(vm, calls, if_match=if_match)
    results = []
    for i, region in enumerate(body.regions):
        out = outcomes[i] if i < len(outcomes) else None
        if isinstance(out, KvmError):
            results.append(
                {
                    "slot": region.slot,
                    "outcome": "rejected",
                    "change": None,
                    "errno": out.errno,
                    "errno_name": out.errno_name,
                    "detail": out.detail,
                    "state_changed": bool(out.state_changed),
                }
            )
            continue
        results.append(
            {
                "slot": region.slot,
                "outcome": "not_attempted" if out is None else "applied",
                "change": None if out is None else out.get("change"),
                "errno": None,
                "errno_name": None,
                "detail": None,
                "state_changed": None,
            }
        )
    applied = sum(1 for r in results if r["outcome"] == "applied")
    # The answer is `MemslotBatchResult` (its OpenAPI schema), serialised here in one pass:
    # validating thousands of outcomes as models cost more than applying them.
    answer = Response(
        orjson.dumps({"results": results, "applied": applied}), media_type="application/json"
    )
    set_etag(answer, tag)
    return answer


@router.delete(
    "/{slot}",
    summary="Delete the slot (KVM_SET_USER_MEMORY_REGION2 with memory_size 0)",
    responses=_MUTATION,
)
async def delete_memslot(
    vm: VmId, slot: Slot, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> MemslotChange:
    args = MemoryRegion(guest_phys_addr=0, memory_size=0, userspace_addr=0).engine_args(slot)
    result = await mutate(service, vm, ops.SetUserMemoryRegion.from_json(args), if_match, response)
    return MemslotChange.model_validate(result)


@router.get(
    "",
    summary="The VM's memslots, ordered by slot (KVM's internal slots are never listed)",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def list_memslots(
    vm: VmId, service: ServiceDep, response: Response, limit: LimitQ = 100, cursor: Cursor = None
) -> Page[Memslot]:
    items = await query(service, vm, lambda v: v.memslots(), response)
    items = sorted(items, key=lambda m: m["slot"])
    return Page[Memslot].model_validate(paginate(items, lambda m: m["slot"], limit, cursor))


@router.get(
    "/{slot}", summary="One memslot", responses=responses(R_KVM, R_NOT_FOUND, R_QUERY, R_ETAG)
)
async def get_memslot(vm: VmId, slot: Slot, service: ServiceDep, response: Response) -> Memslot:
    return Memslot.model_validate(await query(service, vm, lambda v: v.memslot(slot), response))


@router.get(
    "/{slot}/dirty-log",
    summary="KVM_GET_DIRTY_LOG: without manual protect and when something was dirty, it "
    "clears the log and re-protects those pages (hence journaled)",
    description="With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled, or when no page was dirty, it "
    "only reads the log; clearing is then KVM_CLEAR_DIRTY_LOG's job.",
    responses=_MUTATION,
)
async def get_dirty_log(
    vm: VmId, slot: Slot, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> DirtyLog:
    result = await mutate(
        service, vm, ops.GetDirtyLog.from_json({"slot": slot}), if_match, response
    )
    return DirtyLog.model_validate({"sptes_write_protected": 0} | result)


@router.post(
    "/{slot}/dirty-log/clear",
    summary="KVM_CLEAR_DIRTY_LOG: clear the given dirty bits and write-protect those pages",
    description="Allowed without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, as in the kernel (which "
    "does not check for it).",
    responses=_MUTATION,
)
async def clear_dirty_log(
    vm: VmId,
    slot: Slot,
    body: DirtyLogClear,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> DirtyLogCleared:
    args = {"slot": slot, **body.model_dump()}
    result = await mutate(service, vm, ops.ClearDirtyLog.from_json(args), if_match, response)
    # Nothing to clear: the engine answers no write-protect count.
    return DirtyLogCleared.model_validate({"sptes_write_protected": 0} | result)
