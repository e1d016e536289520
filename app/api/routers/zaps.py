"""Explicit (diagnostic) zaps, the zap event log, and the zap-policy experiment."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import Cursor, IfMatchDep, LimitQ, ServiceDep, VmId, mutate, paginate, query
from app.api.errors import R_BODY, R_KVM, R_NOT_FOUND, R_PRECONDITION, R_QUERY, responses
from app.api.schemas.common import Empty
from app.api.schemas.memslots import ZapSummary
from app.api.schemas.pages import Page
from app.api.schemas.zaps import ZapEvent, ZapPolicy, ZapRequest

router = APIRouter(prefix="/v1/vms/{vm}", tags=["zaps"])
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION)


@router.post(
    "/zaps",
    summary="Zap now: `all` is KVM's fast zap (direct roots only); `range` zaps [gpa, gpa+size)",
    description="Wiping a live TD's private (mirror) root is refused with EPERM, as in KVM.",
    responses=_MUTATION,
)
async def create_zap(
    vm: VmId, body: ZapRequest, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> ZapSummary:
    return ZapSummary.model_validate(
        await mutate(service, vm, "zap", body.model_dump(), if_match, response)
    )


@router.get(
    "/zaps",
    summary="Zap events, newest first",
    responses=responses(R_NOT_FOUND, R_QUERY),
)
async def list_zaps(
    vm: VmId, service: ServiceDep, response: Response, limit: LimitQ = 100, cursor: Cursor = None
) -> Page[ZapEvent]:
    items = await query(service, vm, lambda v: v.zap_events(), response)
    items = sorted(items, key=lambda e: e["seq"], reverse=True)
    return Page[ZapEvent].model_validate(
        paginate(items, lambda e: e["seq"], limit, cursor, descending=True)
    )


@router.post(
    "/zap-policy",
    summary="EXPERIMENT, NOT KVM: choose the memslot zap policy",
    description=(
        "**This is not KVM.** `kvm` (the default) does what the kernel does. "
        "`zap_all_shared_only` is the design KVM rejected for VMs with private memory: on "
        "memslot delete/move it zaps every *shared* SPTE and leaves private ones mapped. It "
        "exists only to demonstrate the resulting use-after-free: delete a slot, punch its "
        "guest_memfd, and `GET …/audit` reports a private SPTE mapping a freed page. Never "
        "rely on results obtained under this policy as a model of KVM."
    ),
    responses=_MUTATION,
)
async def set_zap_policy(
    vm: VmId, body: ZapPolicy, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> Empty:
    return Empty.model_validate(
        await mutate(service, vm, "set_zap_policy", body.model_dump(), if_match, response)
    )
