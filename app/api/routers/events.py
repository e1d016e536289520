"""`GET /v1/events` and `GET /v1/vms/{vm}/events`: the live event stream (Server-Sent Events).

One stream format for every consumer (the dashboard, `vkmmu top`, scripts): each event is

    event: <type>
    id: <id>
    data: {"id": …, "type": …, "vm": …, "at": …, "data": {…}}

A new stream starts with the events that happen from then on; `?after=0` replays what the
service still holds first (its last 4,096 events). Reconnecting with `Last-Event-ID` (or
`?after=`) resumes after that id.
Control events carry no `id` (a client's resume point never moves past a real event):
`gap` (events between the given id and the ring's oldest were lost), `dropped` (this client
fell too far behind: its buffer was freed, it may resume from `last_id`), `end` (the VM was
deleted or the service is shutting down). Comment lines (`: keep-alive`) are heartbeats.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.api.auth import Principal, StreamSlots, principal_of
from app.api.deps import VmId, get_service, name_list
from app.api.errors import R_ETAG, R_NOT_FOUND, R_QUERY, responses
from app.api.routing import ApiRouter
from app.services.events import EVENT_TYPES, Control, Event, EventBus

router = ApiRouter(tags=["events"])

RETRY_MS = 2000
_DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else ""

TypesQ = Annotated[
    str | None,
    Query(description=f"Comma-separated event types to receive: {', '.join(EVENT_TYPES)}."),
]
AfterQ = Annotated[int | None, Query(ge=0, description="resume after this event id")]
TimeoutQ = Annotated[
    float | None,
    Query(gt=0, le=86400, description="end the stream after this many seconds (default: never)"),
]
HeartbeatQ = Annotated[
    float, Query(ge=0.05, le=300, description="seconds between heartbeats when idle")
]
LastEventId = Annotated[str | None, Header(description="resume after this event id")]
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}
}


def parse_types(types: str | None) -> frozenset[str] | None:
    return name_list(types, EVENT_TYPES, "types", "event type")


def resume_point(after: int | None, last_event_id: str | None) -> int | None:
    """Where to resume: `?after=`, else `Last-Event-ID`; None: live events only."""
    if after is not None:
        return after
    if last_event_id is not None and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return None


def sse(item: Event | Control | None) -> bytes:
    if item is None:
        return b": keep-alive\n\n"
    if isinstance(item, Control):
        return b"event: %s\ndata: %s\n\n" % (item.type.encode(), orjson.dumps(item.data))
    return b"event: %s\nid: %d\ndata: %s\n\n" % (
        item.type.encode(),
        item.id,
        orjson.dumps(item.to_json()),
    )


def event_stream(
    request: Request,
    *,
    vm: str | None,
    types: frozenset[str] | None,
    after: int | None,
    heartbeat: float,
    timeout: float | None,
) -> StreamingResponse:
    bus: EventBus = _bus(request)
    principal = principal_of(request)
    slots: StreamSlots = request.app.state.stream_slots
    slots.acquire(principal.tenant)  # 429 past the tenant's open streams
    released = False

    def release() -> None:  # once: when the stream ends, or if it never started
        nonlocal released
        if not released:
            released = True
            slots.release(principal.tenant)

    try:
        sub = bus.subscribe(vm=vm, types=types, visible=_visible(request, principal))
    except BaseException:
        release()
        raise
    if after is None:  # from now on (what the ring holds is history)
        after = bus.ring[-1].id if bus.ring else 0
    start = after
    deadline = None if timeout is None else time.monotonic() + timeout

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"retry: %d\n\n" % RETRY_MS
            async for item in bus.stream(
                sub, after=start, heartbeat_s=heartbeat, deadline=deadline
            ):
                yield sse(item)
        finally:
            release()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        background=BackgroundTask(release),
    )


def _bus(request: Request) -> Any:
    return get_service(request).events  # type: ignore[attr-defined]


def _visible(request: Request, principal: Principal) -> Callable[[str | None], bool] | None:
    """A tenant's stream carries its own VMs' events only (fail closed: a VM this process
    has not seen yet is not shown)."""
    tenant = principal.tenant
    if tenant is None:
        return None
    service = get_service(request)
    return lambda vm: service.tenant_of(vm) == tenant


@router.get(
    "/v1/events",
    summary="Every VM's events as they happen (Server-Sent Events)",
    description=_DESCRIPTION,
    response_class=StreamingResponse,
    responses={**_SSE, **responses(R_QUERY)},
)
async def stream_events(
    request: Request,
    types: TypesQ = None,
    after: AfterQ = None,
    timeout: TimeoutQ = None,
    heartbeat: HeartbeatQ = 15.0,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    return event_stream(
        request,
        vm=None,
        types=parse_types(types),
        after=resume_point(after, last_event_id),
        heartbeat=heartbeat,
        timeout=timeout,
    )


@router.get(
    "/v1/vms/{vm}/events",
    summary="One VM's events as they happen (Server-Sent Events)",
    description=_DESCRIPTION + '\n\nThe stream ends with `end {"reason": "vm_deleted"}` '
    "after the VM's `vm_deleted` event. Its `ETag` is the VM's version when it opened.",
    response_class=StreamingResponse,
    responses={
        **responses(R_NOT_FOUND, R_QUERY),
        200: {**_SSE[200], "headers": R_ETAG[200]["headers"]},
    },
)
async def stream_vm_events(
    request: Request,
    vm: VmId,
    types: TypesQ = None,
    after: AfterQ = None,
    timeout: TimeoutQ = None,
    heartbeat: HeartbeatQ = 15.0,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    wanted = parse_types(types)
    service = get_service(request)
    # A 404 problem before streaming when the VM does not exist.
    _, etag = await service.get_vm(vm)
    answer = event_stream(
        request,
        vm=vm,
        types=wanted,
        after=resume_point(after, last_event_id),
        heartbeat=heartbeat,
        timeout=timeout,
    )
    answer.headers["ETag"] = etag
    return answer
