"""What a vCPU does: accesses (guest page faults), loads, stores, pre-fault, TDX accept, and
the hypercall that asks the VMM to convert memory.

An exit (MMIO, MEMORY_FAULT, …) is the guest's outcome, not an API error: 200 with `exit`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response

from app.api.deps import IfMatchDep, ServiceDep, Vcpu, VmId, mutate
from app.api.errors import R_BODY, R_ETAG, R_KVM, R_NOT_FOUND, R_PRECONDITION, responses
from app.api.routing import ApiRouter
from app.api.schemas.guest import (
    Accept,
    AcceptResult,
    Access,
    AccessResult,
    Load,
    LoadResult,
    PreFault,
    PreFaultResult,
    Store,
    StoreResult,
)
from app.api.schemas.tdx import Hypercall, MapGpaResult
from app.engine import ops

router = ApiRouter(prefix="/v1/vms/{vm}/vcpus/{vcpu}", tags=["guest"])
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG)


def _args(body: Any, vcpu: int) -> dict[str, Any]:
    return {"vcpu": vcpu, **body.model_dump()}


@router.post(
    "/accesses",
    summary="The guest touches [gpa, gpa+size): faults pages in until the first exit",
    responses=_MUTATION,
)
async def access_memory(
    vm: VmId,
    vcpu: Vcpu,
    body: Access,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> AccessResult:
    result = await mutate(service, vm, ops.Access.from_json(_args(body, vcpu)), if_match, response)
    return AccessResult.model_validate(result)


@router.post(
    "/load",
    summary="One guest load through the fault path: the data, or the exit that stopped it",
    responses=_MUTATION,
)
async def load(
    vm: VmId, vcpu: Vcpu, body: Load, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> LoadResult:
    result = await mutate(service, vm, ops.Load.from_json(_args(body, vcpu)), if_match, response)
    return LoadResult.model_validate({"data": None, "exit": None} | result)


@router.post(
    "/store",
    summary="One guest store through the fault path: `exit` null, or the exit that stopped it",
    responses=_MUTATION,
)
async def store(
    vm: VmId,
    vcpu: Vcpu,
    body: Store,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> StoreResult:
    result = await mutate(service, vm, ops.Store.from_json(_args(body, vcpu)), if_match, response)
    return StoreResult.model_validate({"exit": None} | result)


@router.post(
    "/pre-fault",
    summary="KVM_PRE_FAULT_MEMORY: answers the struct after the call (what is left)",
    responses=_MUTATION,
)
async def pre_fault(
    vm: VmId,
    vcpu: Vcpu,
    body: PreFault,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> PreFaultResult:
    result = await mutate(
        service, vm, ops.PreFault.from_json(_args(body, vcpu)), if_match, response
    )
    return PreFaultResult.model_validate(result)


@router.post(
    "/accept",
    summary="A TD guest's TDG.MEM.PAGE.ACCEPT of [gpa, gpa+size)",
    responses=_MUTATION,
)
async def accept(
    vm: VmId,
    vcpu: Vcpu,
    body: Accept,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> AcceptResult:
    return AcceptResult.model_validate(
        await mutate(service, vm, ops.Accept.from_json(_args(body, vcpu)), if_match, response)
    )


@router.post(
    "/hypercall",
    summary="The guest's VMCALL (KVM hypercall ABI): KVM_HC_MAP_GPA_RANGE exits to userspace",
    description="With KVM_CAP_EXIT_HYPERCALL (bit 12) a page-aligned, non-empty, non-wrapping "
    "KVM_HC_MAP_GPA_RANGE becomes a KVM_EXIT_HYPERCALL carrying the guest's arguments; the VMM "
    "converts with KVM_SET_MEMORY_ATTRIBUTES and completes the exit (…/hypercall/complete). "
    "Otherwise the guest gets RAX = -KVM_EPERM (CPL > 0), -KVM_ENOSYS (exit not enabled, "
    "unknown nr) or -KVM_EINVAL (bad range) (____kvm_emulate_hypercall). Other known "
    "hypercalls (kick, IPI, yield, clock pairing) answer EOPNOTSUPP: not modelled.",
    responses=_MUTATION,
)
async def hypercall(
    vm: VmId,
    vcpu: Vcpu,
    body: Hypercall,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> MapGpaResult:
    return MapGpaResult.model_validate(
        await mutate(service, vm, ops.Hypercall.from_json(_args(body, vcpu)), if_match, response)
    )
