"""`KVM_CHECK_EXTENSION` on /dev/kvm."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.errors import responses
from app.engine import uapi
from app.engine.capabilities import kvm_check_extension

router = APIRouter(prefix="/v1", tags=["capabilities"])


@router.get(
    "/capabilities",
    summary="KVM_CHECK_EXTENSION on /dev/kvm, for every capability vkmmu models",
    responses=responses(),
)
async def get_capabilities() -> dict[str, int]:
    return {cap.name: kvm_check_extension(int(cap)) for cap in uapi.Cap}
