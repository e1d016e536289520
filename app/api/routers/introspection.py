"""Read-only views of the MMU: translate, mappings, roots, stats, audit, TDX state."""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Query, Response

from app.api.deps import Cursor, LimitQ, ServiceDep, VmId, paginate, query
from app.api.errors import R_ETAG, R_KVM, R_NOT_FOUND, R_QUERY, responses
from app.api.routing import ApiRouter
from app.api.schemas.common import U32, U64, Answer
from app.api.schemas.introspection import (
    Audit,
    Mapping,
    RootInfo,
    StatDescriptorInfo,
    StatDescriptors,
    Stats,
    TdxState,
    Translation,
    translation,
)
from app.api.schemas.pages import Page
from app.engine.stat_descriptors import DESCRIPTORS
from app.engine.views import TranslateView

if TYPE_CHECKING:
    from app.engine.vm import Vm

router = ApiRouter(prefix="/v1/vms/{vm}", tags=["introspection"])
descriptors_router = ApiRouter(prefix="/v1/stats", tags=["stats"])
_READ = responses(R_NOT_FOUND, R_QUERY, R_ETAG)


@router.get(
    "/translate",
    summary="Walk the page tables for a GPA: per root, the entry at each level (raw and "
    "decoded) and where the GPA lands (an HVA of the VMM's memory, or a guest_memfd page)",
    responses=responses(R_KVM, R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def translate(
    vm: VmId,
    gpa: Annotated[U64, Query(description="Guest physical address (decimal or 0x…).")],
    service: ServiceDep,
    response: Response,
) -> Translation:
    def walk(v: Vm) -> tuple[TranslateView, list[dict[str, Any]]]:
        return v.translate(gpa), v.guest_memfds()

    view, files = await query(service, vm, walk, response)
    return translation(view, files)


# A mappings cursor is where the next page begins: `<root id>:<GFN position>`.
MappingCursor = Annotated[
    str | None,
    Query(
        pattern=r"^[0-9]{1,10}:[0-9]{1,20}$",
        description="`next_cursor` of the previous page (`<root>:<position>`: the next page "
        "lists the runs from there on).",
    ),
]


@router.get(
    "/mappings",
    summary="Run-length leaf mappings per root, in (root, position) order",
    description="Paged by walking the page tables from the cursor: a page costs the tables "
    "it covers, not the whole VM's.",
    responses=_READ,
)
async def list_mappings(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    root: Annotated[U32 | None, Query(description="Only this root (its `id` in …/roots).")] = None,
    limit: LimitQ = 100,
    cursor: MappingCursor = None,
) -> Page[Mapping]:
    start = (0, 0)
    if cursor is not None:
        at_root, _, position = cursor.partition(":")
        start = (int(at_root), int(position))
    # One more run than the page: whether there is a next page, without walking further.
    items = await query(
        service, vm, lambda v: list(islice(v.iter_mappings(root, start), limit + 1)), response
    )
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        next_cursor = f"{last['root']}:{last['position'] + last['npages']}"
    return Page[Mapping].model_validate({"items": items, "next_cursor": next_cursor})


@router.get(
    "/roots",
    summary="TDP roots: role, valid/obsolete, generation, SPTE counts; ordered by root id",
    responses=_READ,
)
async def list_roots(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    limit: LimitQ = 100,
    cursor: Cursor = None,
) -> Page[RootInfo]:
    items = await query(service, vm, lambda v: v.roots(), response)
    items = sorted(items, key=lambda r: r["id"])
    return Page[RootInfo].model_validate(paginate(items, lambda r: r["id"], limit, cursor))


@router.get(
    "/stats",
    summary="The kernel's VM stat names plus vkmmu's counters (GET /v1/stats/descriptors "
    "says what each one is)",
    responses=_READ,
    response_model=Stats,
    response_model_exclude_unset=True,
)
async def get_stats(vm: VmId, service: ServiceDep, response: Response) -> Answer:
    # exclude_unset: the TDX stats are left out for a VM that is not a TD.
    return Stats.model_validate(await query(service, vm, lambda v: v.stats(), response))


@descriptors_router.get(
    "/descriptors",
    summary="What each stat of GET …/stats is: kind (cumulative, instant, peak), unit, source",
    description="Shaped after the kernel's binary-stats descriptors (`struct kvm_stats_desc`).",
    responses=responses(R_QUERY),
)
async def get_stat_descriptors() -> StatDescriptors:
    items = [
        StatDescriptorInfo(
            name=d.name,
            kind=d.kind,
            unit=d.unit,
            source=d.source,
            description=d.description,
            tdx_only=d.tdx_only,
        )
        for d in DESCRIPTORS
    ]
    return StatDescriptors(items=items)


@router.get(
    "/audit",
    summary="Check every invariant (no stale leaf, no freed page mapped, stats agree, …)",
    responses=_READ,
)
async def audit(vm: VmId, service: ServiceDep, response: Response) -> Audit:
    return Audit.model_validate(await query(service, vm, lambda v: v.audit(), response))


@router.get(
    "/tdx",
    summary="A TD's modelled TDX module state: S-EPT, SEAMCALL-like operation counts, accepts",
    description="EINVAL (400) for a VM that is not a TD.",
    responses=responses(R_KVM, R_NOT_FOUND, R_ETAG),
)
async def get_tdx_state(vm: VmId, service: ServiceDep, response: Response) -> TdxState:
    return TdxState.model_validate(await query(service, vm, lambda v: v.tdx_state(), response))
