"""Trace replay (`POST …/replay`) and what-if (`POST …/what-if`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import IfMatchDep, ServiceDep, VmId, set_etag
from app.api.errors import (
    R_BODY,
    R_ETAG,
    R_KVM,
    R_NOT_FOUND,
    R_PRECONDITION,
    ApiProblem,
    responses,
)
from app.api.routing import ApiRouter
from app.api.schemas.replay import ReplayProgress, ReplayResult, WhatIfRequest, WhatIfResult
from app.engine.errors import KvmError
from app.services import qemu_trace, replay, whatif
from app.services.errors import ServiceError

router = ApiRouter(prefix="/v1/vms/{vm}", tags=["replay"])

NDJSON = "application/x-ndjson"
_RANGE_RE = r"\s*(0[xX][0-9a-fA-F]+|\d+)\s*\+\s*(0[xX][0-9a-fA-F]+|\d+)\s*"
_RANGE = re.compile(f"^{_RANGE_RE}$")
# The query's shape, published as its pattern (a range's values are checked after it).
TOUCH_PATTERN = f"^(none|all_ram|after_each|{_RANGE_RE}(,{_RANGE_RE})*)$"
_TRACE_BODY = {
    "required": True,
    "content": {
        "text/plain": {
            "schema": {"type": "string"},
            "example": "kvm_set_user_memory AddrSpace#0 Slot#0 flags=0x0 gpa=0x0 size=0xa0000 "
            "ua=0x7f2a00000000 guest_memfd=-1 guest_memfd_offset=0x0 ret=0\n",
        },
        NDJSON: {
            "schema": {
                "type": "string",
                "description": "one JSON object per line: {slot, as_id?, flags, gpa, size, ua, "
                "ret} (integers or 0x… strings)",
            }
        },
    },
}


def _touch_query(value: str | None) -> replay.Touch:
    """`none | all_ram | after_each`, or `gpa+size[,gpa+size…]` ranges."""
    if value is None or value in replay.TOUCH_MODES:
        return replay.Touch(value or "none")
    ranges = []
    for part in value.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise ApiProblem(
                422,
                "Bad touch",
                "touch is none, all_ram, after_each or gpa+size ranges separated by commas",
                "validation",
            )
        ranges.append({"gpa": m.group(1), "size": m.group(2)})
    try:
        return replay.Touch.parse(ranges)
    except replay.OpError as e:
        raise ApiProblem(422, "Bad touch", str(e), "validation") from None


def _int_field(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("an integer, not a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 0)
    raise ValueError("an integer or a 0x… string")


def parse_json_lines(text: str, first_line: int) -> qemu_trace.Trace:
    """JSON lines, one traced call per line: `{slot, as_id?, flags, gpa, size, ua, ret}`."""
    out = qemu_trace.Trace()
    for n, raw in enumerate(text.splitlines(), start=first_line):
        out.lines += 1
        if not raw.strip():
            out.ignored += 1
            continue
        try:
            obj = orjson.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("a line is a JSON object")
            unknown = set(obj) - {"slot", "as_id", "flags", "gpa", "size", "ua", "ret"}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            slot = _int_field(obj["slot"])
            if "as_id" in obj:
                as_id = _int_field(obj["as_id"])
                if not (0 <= as_id <= 0xFFFF and 0 <= slot <= 0xFFFF):
                    raise ValueError("as_id and slot are 16-bit each when as_id is given")
                slot = as_id << 16 | slot
            call = qemu_trace.TraceCall(
                line=n,
                slot=slot,
                flags=_int_field(obj.get("flags", 0)),
                gpa=_int_field(obj["gpa"]),
                size=_int_field(obj["size"]),
                ua=_int_field(obj["ua"]),
                ret=_int_field(obj.get("ret", 0)),
            )
            if not 0 <= call.slot < 1 << 32 or not 0 <= call.flags < 1 << 32:
                raise ValueError("slot and flags are 32-bit")
            if any(not 0 <= x < 1 << 64 for x in (call.gpa, call.size, call.ua)):
                raise ValueError("gpa, size and ua are unsigned 64-bit")
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            out.errors.append(qemu_trace.TraceError(n, msg[:200]))
            continue
        out.calls.append(call)
    return out


@router.post(
    "/replay",
    response_model=ReplayResult,
    summary="Replay a QEMU kvm_set_user_memory trace onto the VM (journaled)",
    description=(
        "The body is QEMU trace text (`text/plain`: `kvm_set_user_memory Slot#N …` or "
        "`AddrSpace#A Slot#N …` lines, with or without a `pid@time:` prefix) or JSON lines "
        f"(`{NDJSON}`). Each call is applied in order through the journal, so the VM keeps "
        "the result. One row per applied line says what changed, the zap, the errno, and "
        "whether the VM answered what the traced kernel did (`matches_trace`). Lines that "
        "do not parse are listed in `errors` with their number and skipped; comments and "
        "other lines are counted in `ignored`. `touch` makes the guest read memory between "
        "lines so that zaps cost refaults. With `Accept: text/event-stream` the answer is a "
        "stream of `progress` events and a last `result` (or `error`) event. Bodies over the "
        "service's limit are refused (413): send a long trace in chunks, `first_line` "
        "numbering each chunk's lines as in the whole file."
    ),
    openapi_extra={"requestBody": _TRACE_BODY},
    responses={
        **responses(R_BODY, R_NOT_FOUND, R_KVM, R_PRECONDITION, R_ETAG),
        200: {
            "content": {"text/event-stream": {}},
            "description": "the replay (JSON), or its progress as Server-Sent Events",
            "headers": R_ETAG[200]["headers"],
        },
    },
)
async def replay_run(
    vm: VmId,
    request: Request,
    service: ServiceDep,
    response: Response,
    if_match: IfMatchDep,
    touch: Annotated[
        str | None,
        Query(
            max_length=4096,
            pattern=TOUCH_PATTERN,
            description="none | all_ram | after_each | gpa+size[,gpa+size…] (each size > 0, "
            "gpa+size within 64 bits)",
        ),
    ] = None,
    first_line: Annotated[
        int, Query(ge=1, le=1 << 40, description="number of the body's first line")
    ] = 1,
) -> Any:
    mode = _touch_query(touch)
    text = (await request.body()).decode("utf-8", errors="replace")
    ctype = request.headers.get("content-type", "text/plain").split(";")[0].strip().lower()
    if ctype in (NDJSON, "application/jsonl", "application/json-lines"):
        trace = parse_json_lines(text, first_line)
    elif ctype in ("text/plain", ""):
        trace = qemu_trace.parse(text, first_line=first_line)
    else:
        raise ApiProblem(
            415,
            "Unsupported Media Type",
            f"send text/plain (a QEMU trace) or {NDJSON} (JSON lines)",
            "unsupported-media-type",
        )
    if "text/event-stream" in request.headers.get("accept", ""):
        # Fail before streaming when the VM does not exist (a 404 problem, not a stream).
        await service.read(vm, lambda v: None)
        return StreamingResponse(
            _stream(service, vm, trace, mode, if_match), media_type="text/event-stream"
        )
    answer, tag = await replay.replay(service, vm, trace, mode, if_match=if_match)
    set_etag(response, tag)
    return ReplayResult.model_validate(answer)


async def _stream(
    service: Any, vm: str, trace: qemu_trace.Trace, mode: replay.Touch, if_match: str | None
) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def progress(done: int, total: int) -> None:
        body = ReplayProgress(done=done, total=total).model_dump_json()
        await queue.put(b"event: progress\ndata: %s\n\n" % body.encode())

    async def run() -> None:
        try:
            answer, _ = await replay.replay(
                service, vm, trace, mode, progress=progress, if_match=if_match
            )
            body = ReplayResult.model_validate(answer).model_dump_json(by_alias=True)
            await queue.put(b"event: result\ndata: %s\n\n" % body.encode())
        except (KvmError, ServiceError) as e:
            err: dict[str, Any] = {"title": type(e).__name__, "detail": str(e)}
            if isinstance(e, KvmError):
                err.update(errno=e.errno, errno_name=e.errno_name)
            await queue.put(b"event: error\ndata: %s\n\n" % orjson.dumps(err))
        finally:
            await queue.put(None)

    # The replay runs to its end even if the client goes away: every batch it commits is
    # a consistent, journaled state, and the client learns the outcome from the VM.
    task = asyncio.get_running_loop().create_task(run())
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    while (item := await queue.get()) is not None:
        yield item


_TASKS: set[asyncio.Task[None]] = set()


@router.post(
    "/what-if",
    summary="Run operations on in-memory forks of the VM, one per variant, and compare",
    description=(
        "The VM is copied under its lock and never changed. Each variant's fork gets its "
        "own disabled-quirk mask (`disable_quirks`: 128 turns KVM_X86_QUIRK_SLOT_ZAP_ALL off; "
        "a what-if may turn a quirk back on, which KVM cannot: it is a hypothesis), zap "
        "policy, or VM type (only while the VM has no memslots). The same `ops` (or `trace`) "
        "run on each; each row has the counts at its top level and, separately, an "
        "`estimate` of guest time from the cost model (a model: docs/cost-model.md). Forks "
        "count against the page-table budget (ENOMEM, 507, before allocating). More variants "
        "or ops than the service allows (VKMMU_WHATIF_MAX_VARIANTS, VKMMU_WHATIF_MAX_OPS) "
        "is a 422. A variant's `host` sets the fork's host profile (PML, eager page split, NX "
        "huge pages) over the VM's own; `tdp_mmu: false` is EOPNOTSUPP."
    ),
    responses=responses(R_BODY, R_NOT_FOUND, R_KVM, R_PRECONDITION, R_ETAG),
)
async def whatif_run(
    vm: VmId,
    body: WhatIfRequest,
    request: Request,
    service: ServiceDep,
    response: Response,
    if_match: IfMatchDep,
) -> WhatIfResult:
    settings = request.app.state.settings
    try:
        touch = replay.Touch.parse(
            body.touch
            if isinstance(body.touch, str)
            else [{"gpa": r.gpa, "size": r.size} for r in body.touch]
        )
        trace = None if body.trace is None else qemu_trace.parse(body.trace)
        if trace is not None and trace.errors:
            first = trace.errors[0]
            raise whatif.WhatIfError(
                f"trace line {first.line}: {first.message} ({len(trace.errors)} bad lines)"
            )
        answer = await whatif.what_if(
            service,
            vm,
            variants=[
                whatif.Variant(
                    v.name,
                    v.disable_quirks,
                    v.vm_type,
                    v.zap_policy,
                    None if v.host is None else v.host.given(),
                )
                for v in body.variants
            ],
            ops=body.ops,
            trace=trace,
            touch=touch,
            costs=body.costs,
            max_variants=settings.whatif_max_variants,
            max_ops=settings.whatif_max_ops,
            if_match=if_match,
        )
    except (whatif.WhatIfError, replay.OpError) as e:
        raise ApiProblem(422, "Bad what-if", str(e), "validation") from None
    set_etag(response, answer["version"])
    return WhatIfResult.model_validate(answer)
