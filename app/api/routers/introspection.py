"""Read-only views of the MMU: translate, mappings, roots, stats, audit."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from app.api.deps import Cursor, LimitQ, ServiceDep, VmId, paginate, query
from app.api.errors import R_ETAG, R_KVM, R_NOT_FOUND, R_QUERY, responses
from app.api.schemas.common import U32, U64, Open
from app.api.schemas.pages import Page

router = APIRouter(prefix="/v1/vms/{vm}", tags=["introspection"])
_READ = responses(R_NOT_FOUND, R_QUERY, R_ETAG)


class Audit(Open):
    ok: bool
    violations: list[Any]


@router.get(
    "/translate",
    summary="Walk the page tables for a GPA: per root, the entry at each level (raw hex)",
    responses=responses(R_KVM, R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def translate(
    vm: VmId,
    gpa: Annotated[U64, Query(description="Guest physical address (decimal or 0x…).")],
    service: ServiceDep,
    response: Response,
) -> Open:
    return Open.model_validate(await query(service, vm, lambda v: v.translate(gpa), response))


@router.get(
    "/mappings",
    summary="Run-length leaf mappings per root",
    responses=_READ,
)
async def list_mappings(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    root: Annotated[U32 | None, Query(description="Only this root (its `id` in …/roots).")] = None,
    limit: LimitQ = 100,
    cursor: Cursor = None,
) -> Page[Open]:
    items = await query(service, vm, lambda v: v.mappings(root=root), response)
    # Runs come in walk order (root, then GFN); the cursor is a position in that order.
    indexed = [{"_i": i, **it} for i, it in enumerate(items)]
    page = paginate(indexed, lambda it: it["_i"], limit, cursor)
    page["items"] = [{k: v for k, v in it.items() if k != "_i"} for it in page["items"]]
    return Page[Open].model_validate(page)


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
) -> Page[Open]:
    items = await query(service, vm, lambda v: v.roots(), response)
    items = sorted(items, key=lambda r: r["id"])
    return Page[Open].model_validate(paginate(items, lambda r: r["id"], limit, cursor))


@router.get(
    "/stats",
    summary="The kernel's VM stat names plus refault and zap metrics (flat object)",
    responses=_READ,
)
async def get_stats(vm: VmId, service: ServiceDep, response: Response) -> dict[str, Any]:
    return await query(service, vm, lambda v: v.stats(), response)


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
async def get_tdx_state(vm: VmId, service: ServiceDep, response: Response) -> Open:
    return Open.model_validate(await query(service, vm, lambda v: v.tdx_state(), response))
