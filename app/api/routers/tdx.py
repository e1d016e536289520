"""A TD's lifecycle: the KVM_TDX_* commands of KVM_MEMORY_ENCRYPT_OP, as routes.

KVM_TDX_INIT_VM and KVM_TDX_FINALIZE_VM are VM commands; KVM_TDX_INIT_VCPU and
KVM_TDX_INIT_MEM_REGION are vCPU commands, as in the kernel (arch/x86/kvm/vmx/tdx.c).
"""

from __future__ import annotations

from fastapi import Response

from app.api.deps import IfMatchDep, ServiceDep, Vcpu, VmId, mutate
from app.api.errors import R_BODY, R_ETAG, R_KVM, R_NOT_FOUND, R_PRECONDITION, responses
from app.api.routing import ApiRouter
from app.api.schemas.tdx import (
    HypercallComplete,
    MapGpaResult,
    TdvmcallMapGpa,
    TdxInitMemRegion,
    TdxInitVcpu,
    TdxInitVm,
    TdxLifecycle,
    TdxMemRegion,
)
from app.engine import ops

router = ApiRouter(prefix="/v1/vms/{vm}", tags=["tdx"])
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG)


@router.post(
    "/tdx/init",
    summary="KVM_TDX_INIT_VM: the TD gets its HKID and attributes (uninitialized → initialized)",
    description="ENOTTY on a VM that is not a TD; EINVAL when already initialised, for flags, "
    "attributes beyond SEPT_VE_DISABLE or a GPAW other than 48/52 (or not the VM's EPT "
    "level); EBUSY once vCPUs exist (tdx_td_init, setup_tdparams).",
    responses=_MUTATION,
)
async def tdx_init_vm(
    vm: VmId, body: TdxInitVm, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> TdxLifecycle:
    op = ops.TdxInitVm.from_json(body.model_dump())
    return TdxLifecycle.model_validate(await mutate(service, vm, op, if_match, response))


@router.post(
    "/tdx/finalize",
    summary="KVM_TDX_FINALIZE_VM: TDH.MR.FINALIZE, the TD becomes runnable",
    description="EINVAL before KVM_TDX_INIT_VM or when already finalised (tdx_td_finalize). "
    "Before it, KVM_RUN (accesses, loads, stores, accepts) answers EINVAL and "
    "KVM_PRE_FAULT_MEMORY EOPNOTSUPP.",
    responses=_MUTATION,
)
async def tdx_finalize_vm(
    vm: VmId, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> TdxLifecycle:
    op = ops.TdxFinalizeVm()
    return TdxLifecycle.model_validate(await mutate(service, vm, op, if_match, response))


@router.post(
    "/vcpus/{vcpu}/tdx/init",
    summary="KVM_TDX_INIT_VCPU: TDH.VP.CREATE / TDH.VP.INIT for one vCPU",
    description="EINVAL unless the TD is initialised and not finalised, for flags, or for a "
    "vCPU initialised already (tdx_vcpu_ioctl, tdx_vcpu_init).",
    responses=_MUTATION,
)
async def tdx_init_vcpu(
    vm: VmId,
    vcpu: Vcpu,
    body: TdxInitVcpu,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> TdxLifecycle:
    op = ops.TdxInitVcpu.from_json({"vcpu": vcpu, **body.model_dump()})
    return TdxLifecycle.model_validate(await mutate(service, vm, op, if_match, response))


@router.post(
    "/vcpus/{vcpu}/tdx/init-mem-region",
    summary="KVM_TDX_INIT_MEM_REGION: add initial private pages (TDH.MEM.PAGE.ADD, measured "
    "with TDH.MR.EXTEND when flags has KVM_TDX_MEASURE_MEMORY_REGION)",
    description="EINVAL for an uninitialised vCPU, a finalised TD, unknown flags, unaligned "
    "addresses, nr_pages 0 or a shared GPA; per page (kvm_gmem_populate) EINVAL without a "
    "guest_memfd slot or the PRIVATE attribute, EFAULT for a closed guest_memfd or an "
    "unreachable source, EEXIST for a page added already. Pages before a failing one stay "
    "added.",
    responses=_MUTATION,
)
async def tdx_init_mem_region(
    vm: VmId,
    vcpu: Vcpu,
    body: TdxInitMemRegion,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> TdxMemRegion:
    op = ops.TdxInitMemRegion.from_json({"vcpu": vcpu, **body.model_dump()})
    return TdxMemRegion.model_validate(await mutate(service, vm, op, if_match, response))


@router.post(
    "/vcpus/{vcpu}/tdvmcall/map-gpa",
    summary="The TD guest's TDG.VP.VMCALL<MapGPA>: a KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE) "
    "for the first ≤ 2 MiB chunk, or the TDVMCALL status the guest gets back",
    description="Without KVM_CAP_EXIT_HYPERCALL (bit 12) the guest gets "
    "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED; a wrapping, illegal or shared-bit-crossing range "
    "INVALID_OPERAND; an unaligned one ALIGN_ERROR (tdx_map_gpa, in that order). The VMM "
    "converts with KVM_SET_MEMORY_ATTRIBUTES, then completes the exit "
    "(…/hypercall/complete). EINVAL (KVM_RUN) unless the TD is runnable.",
    responses=_MUTATION,
)
async def tdvmcall_map_gpa(
    vm: VmId,
    vcpu: Vcpu,
    body: TdvmcallMapGpa,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> MapGpaResult:
    op = ops.TdvmcallMapGpa.from_json({"vcpu": vcpu, **body.model_dump()})
    return MapGpaResult.model_validate(await mutate(service, vm, op, if_match, response))


@router.post(
    "/vcpus/{vcpu}/hypercall/complete",
    summary="KVM_RUN after KVM_EXIT_HYPERCALL with run->hypercall.ret: the next chunk's exit, "
    "or the status the guest's MapGPA ends with, or the VMCALL's RAX",
    description="After a TD's MapGPA, ret ≠ 0 ends the request with "
    "TDVMCALL_STATUS_INVALID_OPERAND and R11 = the chunk's GPA (tdx_complete_vmcall_map_gpa). "
    "After a VMCALL (…/hypercall) the guest gets ret in RAX, cut to 32 bits outside 64-bit "
    "mode (complete_hypercall_exit). EINVAL when the vCPU is not in a KVM_EXIT_HYPERCALL.",
    responses=_MUTATION,
)
async def complete_hypercall(
    vm: VmId,
    vcpu: Vcpu,
    body: HypercallComplete,
    service: ServiceDep,
    if_match: IfMatchDep,
    response: Response,
) -> MapGpaResult:
    op = ops.CompleteHypercall.from_json({"vcpu": vcpu, **body.model_dump()})
    return MapGpaResult.model_validate(await mutate(service, vm, op, if_match, response))
