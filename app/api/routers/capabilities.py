"""`KVM_CHECK_EXTENSION` on /dev/kvm."""

from __future__ import annotations

from fastapi import Request

from app.api.errors import responses
from app.api.routing import ApiRouter
from app.api.schemas.common import Answer
from app.api.schemas.vms import Capabilities
from app.engine import uapi
from app.engine.capabilities import kvm_check_extension
from app.engine.host_profile import DEFAULT_HOST

router = ApiRouter(prefix="/v1", tags=["capabilities"])


@router.get(
    "/capabilities",
    summary="KVM_CHECK_EXTENSION on /dev/kvm, for every capability vkmmu models",
    responses=responses(),
    response_model=Capabilities,
)
async def get_capabilities(request: Request) -> Answer:
    service = getattr(request.app.state, "service", None)
    host = {**DEFAULT_HOST.to_dict(), **getattr(service, "host_defaults", {})}
    return Capabilities.model_validate(
        {cap.name: kvm_check_extension(int(cap)) for cap in uapi.Cap} | {"host": host}
    )
