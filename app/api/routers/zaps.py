"""Explicit (diagnostic) zaps, the zap event log, and the zap-policy experiment."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from app.api.deps import Cursor, IfMatchDep, LimitQ, ServiceDep, VmId, mutate, paginate, query
from app.api.errors import (
    R_BODY,
    R_ETAG,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    R_QUERY,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.pages import Page
from app.api.schemas.zaps import (
    NxRecoverRequest,
    NxRecoverResult,
    ZapEvent,
    ZapPolicy,
    ZapPolicyState,
    ZapRequest,
)
from app.engine import ops
from app.services.events import Control

# A date and a time, as the spec's `date-time` says; pydantic alone would also take a number
# of seconds ("0.5"), which the spec does not allow.
_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?$"
)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _DATE_TIME.match(value):
        raise ValueError("expected an RFC 3339 date-time, e.g. 2026-01-02T03:04:05Z")
    return value


router = ApiRouter(prefix="/v1/vms/{vm}", tags=["zaps"])
_MUTATION = responses(R_KVM, R_BODY, R_NOT_FOUND, R_PRECONDITION, R_ETAG)


@router.post(
    "/zaps",
    summary="Zap now: `all` is KVM's fast zap (direct roots only); `range` zaps [gpa, gpa+size)",
    description="Wiping a live TD's private (mirror) root is refused with EPERM. That is "
    "vkmmu's rule, not an ioctl's answer: KVM never zaps a live TD's mirror root "
    "(kvm-private-tdx.md §5.4), so there is no KVM errno to copy.",
    responses=_MUTATION,
)
async def create_zap(
    vm: VmId, body: ZapRequest, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> ZapEvent:
    return ZapEvent.model_validate(
        await mutate(service, vm, ops.ExplicitZap.from_json(body.model_dump()), if_match, response)
    )


@router.post(
    "/nx-huge-pages/recover",
    summary="One run of the NX huge page recovery worker (kvm_recover_nx_huge_pages): zaps "
    "the oldest possible NX huge pages so non-exec faults can map them huge again",
    description="Only VMs whose host profile has `nx_huge_pages` have any (exec faults build "
    "them); one on a slot with dirty logging is only unaccounted. The zap event's cause is "
    "`nx_recovery`.",
    responses=_MUTATION,
)
async def recover_nx_huge_pages(
    vm: VmId, body: NxRecoverRequest, service: ServiceDep, if_match: IfMatchDep, response: Response
) -> NxRecoverResult:
    op = ops.RecoverNxHugePages.from_json(body.model_dump())
    return NxRecoverResult.model_validate(await mutate(service, vm, op, if_match, response))


@router.get(
    "/zaps",
    summary="Zap events, newest first; `cause`, `path` and `since` filter them",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
)
async def list_zaps(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    cause: Annotated[
        str | None, Query(max_length=64, description="Only events of this cause.")
    ] = None,
    path: Annotated[
        str | None, Query(max_length=64, description="Only events of this zap path.")
    ] = None,
    since: Annotated[
        datetime | None,
        BeforeValidator(_rfc3339),
        Query(description="Only events at or after this time (RFC 3339; no zone means UTC)."),
    ] = None,
    limit: LimitQ = 100,
    cursor: Cursor = None,
) -> Page[ZapEvent]:
    items = await query(service, vm, lambda v: v.zap_events(), response)
    if cause is not None:
        items = [e for e in items if e["cause"] == cause]
    if path is not None:
        items = [e for e in items if e["path"] == path]
    if since is not None:
        after = (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()
        items = [e for e in items if e["at"] >= after]
    items = sorted(items, key=lambda e: e["seq"], reverse=True)
    return Page[ZapEvent].model_validate(
        paginate(items, lambda e: e["seq"], limit, cursor, descending=True)
    )


STREAM_HEARTBEAT_S = 10.0


def _seq(e: dict) -> int:
    return int(e["seq"])


_END = b'event: end\ndata: {"reason": "%s"}\n\n'


@router.get(
    "/zaps/stream",
    summary="Zap events as they happen (Server-Sent Events)",
    description=(
        "A `text/event-stream` of zap events (`event: zap`, `id:` = `seq`, `data:` = the event "
        "as in `GET …/zaps`), oldest first, starting after `after` (or the `Last-Event-ID` "
        "header). The stream ends by itself after `timeout` seconds; reconnect with the last "
        "id to resume without gaps. It also ends, with a last `event: end` whose data says "
        'why (`{"reason": "vm_deleted"}`, `"shutdown"` or `"slow_client"`), when the VM is '
        "deleted, the service stops, or the client reads too slowly. It is the `zap` events "
        "of `GET …/events`, keyed by the zap's `seq`; the VM's earlier zaps come from its "
        "state first, so no `after` is too old."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **responses(R_NOT_FOUND, R_QUERY)},
)
async def stream_zaps(
    request: Request,
    vm: VmId,
    service: ServiceDep,
    after: Annotated[int | None, Query(ge=0, description="last seq already seen")] = None,
    timeout: Annotated[float, Query(gt=0, le=300, description="seconds")] = 30.0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    start = after
    if start is None and last_event_id is not None and last_event_id.isdigit():
        start = int(last_event_id)
    if start is None:
        start = 0
    bus = request.app.state.service.events
    # Subscribed before the history is read: nothing committed in between is missed (the
    # seq check drops what both hold).
    sub = bus.subscribe(vm=vm, types=("zap", "vm_deleted"))
    mark = bus.ring[-1].id if bus.ring else 0
    try:
        history, _ = await service.read(
            vm, lambda v: sorted((e for e in v.zap_events() if e["seq"] > start), key=_seq)
        )
    except BaseException:
        bus.unsubscribe(sub)
        raise
    deadline = time.monotonic() + timeout

    async def events() -> AsyncIterator[bytes]:
        seen = start
        for ev in history:
            seen = ev["seq"]
            yield b"event: zap\nid: %d\ndata: %s\n\n" % (seen, _zap_json(ev))
        live = bus.stream(sub, after=mark, heartbeat_s=STREAM_HEARTBEAT_S, deadline=deadline)
        async for item in live:
            if item is None:
                yield b": keep-alive\n\n"
            elif isinstance(item, Control):
                reason = "slow_client" if item.type == "dropped" else item.data.get("reason")
                if item.type != "gap":
                    yield _END % str(reason).encode()
                    return
            elif item.type == "vm_deleted":
                yield _END % b"vm_deleted"
                return
            elif item.data["seq"] > seen and item.data.get("cause") != "vm_destroy":
                # A deleted VM's teardown zap is on `GET /v1/events` only, as `GET …/zaps`
                # of a deleted VM is a 404.
                seen = item.data["seq"]
                yield b"event: zap\nid: %d\ndata: %s\n\n" % (seen, _zap_json(item.data))

    return StreamingResponse(events(), media_type="text/event-stream")


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
) -> ZapPolicyState:
    await mutate(service, vm, ops.SetZapPolicy.from_json(body.model_dump()), if_match, response)
    return ZapPolicyState(policy=body.policy)


def _zap_json(ev: dict[str, Any]) -> bytes:
    """A zap event as the REST answers give it (RFC 3339 `at`, the declared fields)."""
    return ZapEvent.model_validate(ev).model_dump_json(by_alias=True).encode()
