"""VMs (`KVM_CREATE_VM`), their capabilities, `KVM_ENABLE_CAP`, quirks and vCPUs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Response, status

from app.api.auth import PrincipalDep
from app.api.deps import (
    Cursor,
    IfMatchDep,
    LimitQ,
    ServiceDep,
    Vcpu,
    VmCursor,
    VmId,
    mutate,
    paginate,
    query,
    set_etag,
)
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
from app.api.schemas.common import Answer
from app.api.schemas.pages import Page
from app.api.schemas.vms import (
    Capabilities,
    EnableCap,
    EnabledCaps,
    Quirks,
    VcpuCreate,
    VcpuCreated,
    VcpuInfo,
    VcpuSmm,
    VmCreate,
    VmInfo,
)
from app.api.schemas.zaps import ZapEvent
from app.engine import ops, uapi

if TYPE_CHECKING:
    from app.engine.vm import Vm

router = ApiRouter(prefix="/v1/vms", tags=["vms"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="KVM_CREATE_VM (or fork a snapshot with `from_snapshot`)",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_ETAG_CREATED),
)
async def create_vm(
    body: VmCreate, service: ServiceDep, response: Response, principal: PrincipalDep
) -> VmInfo:
    # A fork takes these from its snapshot: pass on only what the client actually sent, for
    # the service to check against the snapshot's VM (422 when they differ).
    fork = body.from_snapshot is not None

    def given(field: str, value: int) -> int | None:
        return None if fork and field not in body.model_fields_set else value

    info, etag = await service.create_vm(
        name=body.name,
        vm_type=given("vm_type", body.vm_type),
        vcpus=given("vcpus", body.vcpus),
        paging_levels=given("paging_levels", body.paging_levels),
        from_snapshot=body.from_snapshot,
        td_lifecycle=body.td_lifecycle,
        host=None if body.host is None else body.host.given(),
        # A tenant's VMs are its own; the admin's are the `default` tenant's.
        tenant=principal.tenant or "default",
        only_tenant=principal.tenant,
    )
    set_etag(response, etag)
    response.headers["Location"] = f"/v1/vms/{info['id']}"
    return VmInfo.model_validate(info)


@router.get("", summary="List VMs, ordered by id", responses=responses(R_QUERY))
async def list_vms(
    service: ServiceDep, principal: PrincipalDep, limit: LimitQ = 100, cursor: VmCursor = None
) -> Page[VmInfo]:
    items, next_cursor = await service.list_vms(limit=limit, cursor=cursor, tenant=principal.tenant)
    return Page[VmInfo].model_validate({"items": items, "next_cursor": next_cursor})


@router.get("/{vm}", summary="One VM", responses=responses(R_NOT_FOUND, R_ETAG))
async def get_vm(vm: VmId, service: ServiceDep, response: Response) -> VmInfo:
    info, etag = await service.get_vm(vm)
    set_etag(response, etag)
    return VmInfo.model_validate(info)


@router.delete(
    "/{vm}",
    summary="Destroy the VM (every root is zapped); answers the teardown's zap summary",
    description="The answer has no ETag: the VM has no version any more (later calls: 404).",
    responses=responses(R_NOT_FOUND, R_PRECONDITION),
)
async def delete_vm(vm: VmId, service: ServiceDep, if_match: IfMatchDep) -> ZapEvent:
    return ZapEvent.model_validate(await service.delete_vm(vm, if_match=if_match))


@router.get(
    "/{vm}/capabilities",
    summary="KVM_CHECK_EXTENSION on the VM fd (answers depend on the VM type)",
    responses=responses(R_NOT_FOUND, R_ETAG),
    response_model=Capabilities,
)
async def get_vm_capabilities(vm: VmId, service: ServiceDep, response: Response) -> Answer:
    def caps(v: Vm) -> dict[str, Any]:
        answer: dict[str, Any] = {cap.name: int(v.check_extension(int(cap))) for cap in uapi.Cap}
        return answer | {"host": v.host_profile.to_dict()}  # the VM's own host profile

    return Capabilities.model_validate(await query(service, vm, caps, response))


@router.post(
    "/{vm}/enable-cap",
    summary="KVM_ENABLE_CAP (DISABLE_QUIRKS, DISABLE_QUIRKS2, MANUAL_DIRTY_LOG_PROTECT2, …)",
    description="Answers the VM's quirks and manual dirty-log protection after the call.",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG),
)
async def enable_cap(
    vm: VmId, body: EnableCap, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> EnabledCaps:
    await mutate(service, vm, ops.EnableCap.from_json(body.engine_args()), if_match, response)
    etag = response.headers["ETag"]
    # Read back under the VM lock; the ETag stays the one of this call.
    state = await query(service, vm, _enabled_caps, response)
    response.headers["ETag"] = etag
    return EnabledCaps.model_validate(state)


def _enabled_caps(v: Vm) -> dict[str, Any]:
    protect = int(v.manual_dirty_log)
    names = [n for n, bit in _PROTECT_BITS.items() if protect & bit]
    return {
        "quirks": v.quirks(),
        "manual_dirty_log_protect": protect,
        "manual_dirty_log_protect_names": names,
        "hypercall_exit_enabled": int(v.hypercall_exit_enabled),
    }


_PROTECT_BITS = {
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "KVM_DIRTY_LOG_INITIALLY_SET": uapi.KVM_DIRTY_LOG_INITIALLY_SET,
}


@router.get(
    "/{vm}/quirks",
    summary="Each KVM_X86_QUIRK_* with whether it is enabled and whether it applies to this VM",
    responses=responses(R_NOT_FOUND, R_ETAG),
)
async def get_quirks(vm: VmId, service: ServiceDep, response: Response) -> Quirks:
    return Quirks.model_validate(await query(service, vm, lambda v: v.quirks(), response))


@router.post(
    "/{vm}/vcpus",
    status_code=status.HTTP_201_CREATED,
    summary="KVM_CREATE_VCPU",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG_CREATED),
)
async def create_vcpu(
    vm: VmId, body: VcpuCreate, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> VcpuCreated:
    result = await mutate(
        service, vm, ops.CreateVcpu.from_json({"id": body.id}), if_match, response
    )
    return VcpuCreated.model_validate(result)


@router.post(
    "/{vm}/vcpus/{vcpu}/smm",
    summary="Enter or leave SMM (KVM_SET_VCPU_EVENTS smm): SMM uses address space 1",
    description="Refused with EINVAL on VM types with private memory (they have no SMM).",
    responses=responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG),
)
async def set_vcpu_smm(
    vm: VmId,
    vcpu: Vcpu,
    body: VcpuSmm,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> VcpuInfo:
    args = {"vcpu": vcpu, "smm": body.smm}
    return VcpuInfo.of(
        await mutate(service, vm, ops.SetVcpuSmm.from_json(args), if_match, response)
    )


@router.get(
    "/{vm}/vcpus",
    summary="The VM's vCPUs, ordered by id",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def list_vcpus(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    limit: LimitQ = 100,
    cursor: Cursor = None,
) -> Page[VcpuInfo]:
    items = await query(service, vm, lambda v: v.vcpus_view(), response)
    page = paginate(items, lambda i: i["id"], limit, cursor)
    return Page[VcpuInfo](
        items=[VcpuInfo.of(i) for i in page["items"]], next_cursor=page["next_cursor"]
    )
