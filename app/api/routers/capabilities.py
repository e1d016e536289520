"""`KVM_CHECK_EXTENSION` on /dev/kvm."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.errors import responses
from app.api.schemas.common import Answer
from app.api.schemas.vms import Capabilities
from app.engine import uapi
from app.engine.capabilities import kvm_check_extension

router = APIRouter(prefix="/v1", tags=["capabilities"])


@router.get(
    "/capabilities",
    summary="KVM_CHECK_EXTENSION on /dev/kvm, for every capability vkmmu models",
    responses=responses(),
    response_model=Capabilities,
)
async def get_capabilities() -> Answer:
    return Capabilities.model_validate(
        {cap.name: kvm_check_extension(int(cap)) for cap in uapi.Cap}
    )
