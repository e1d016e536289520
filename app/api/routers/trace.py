"""`GET /v1/vms/{vm}/trace`: the VM's kvmmmu tracepoints, as `trace-cmd report` prints them.

So a VMM developer can diff vkmmu against a real host: record there with
`trace-cmd record -e kvmmmu`, run the same calls here, compare the event text (docs/trace.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from fastapi import Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from app.api.deps import ServiceDep, VmId, name_list, query
from app.api.errors import R_ETAG, R_NOT_FOUND, R_QUERY, responses
from app.api.routing import ApiRouter
from app.api.schemas.trace import TraceLog, TraceRecord
from app.engine import trace as T

if TYPE_CHECKING:
    from app.engine.vm import Vm

router = ApiRouter(prefix="/v1/vms/{vm}", tags=["trace"])

_BY_NAME = {name: kind for kind, name in T.EVENT_NAMES.items()}


def _kinds(events: str | None) -> list[int] | None:
    wanted = name_list(events, sorted(_BY_NAME), "events", "tracepoint")
    return None if wanted is None else [int(_BY_NAME[e]) for e in wanted]


@router.get(
    "/trace",
    summary="The VM's kvmmmu tracepoints (SPTE changes, faults, splits, fast zaps), as "
    "`trace-cmd report` prints them",
    description=(
        "The newest `VKMMU_TRACE_RECORDS` (default 4,096) records of the VM's page-table work, "
        "oldest first: `kvm_tdp_mmu_spte_changed`, `kvm_mmu_spte_requested`, "
        "`kvm_mmu_set_spte`, `kvm_mmu_split_huge_page`, `kvm_mmu_zap_all_fast`, each with the "
        "text of its TP_printk format in arch/x86/kvm/mmu/mmutrace.h. `format=text` (the "
        "default) answers `text/plain` lines `comm-pid [cpu] seconds: event: text`; "
        "`format=json` answers the records as data. `after` resumes after a record's `seq`; "
        "`limit` keeps the newest N of the answer; `events` filters by tracepoint name. "
        "Records live in memory only: a VM loaded again holds what replaying its journal "
        "since its last snapshot traced."
    ),
    response_model=TraceLog,
    response_description="The records as JSON (`format=json`), or trace-cmd report text",
    responses=responses(R_NOT_FOUND, R_QUERY, R_ETAG),
    # The default answer is text (merged last: FastAPI files only the model's media type).
    openapi_extra={
        "responses": {"200": {"content": {"text/plain": {"schema": {"type": "string"}}}}}
    },
)
async def get_trace(
    vm: VmId,
    service: ServiceDep,
    response: Response,
    after: Annotated[int, Query(ge=0, description="Only records with a larger seq.")] = 0,
    limit: Annotated[
        int | None, Query(ge=1, le=1_000_000, description="Only the newest N records.")
    ] = None,
    events: Annotated[
        str | None,
        Query(
            max_length=512,
            description="Comma-separated tracepoint names: " + ", ".join(sorted(_BY_NAME)),
        ),
    ] = None,
    format: Annotated[
        Literal["text", "json"], Query(description="`text` (trace-cmd report) or `json`.")
    ] = "text",
) -> Response:
    kinds = _kinds(events)

    def read(v: Vm) -> tuple[np.ndarray, int, int]:
        ring = v.mmu.trace
        return ring.records(after), ring.written, ring.capacity

    recs, last, capacity = await query(service, vm, read, response)
    oldest = max(1, last - capacity + 1) if last else 0
    if kinds is not None:
        recs = recs[np.isin(recs["kind"], kinds)]
    if limit is not None:
        recs = recs[-limit:]
    headers = dict(response.headers)
    if format == "json":
        body = TraceLog(
            records=[TraceRecord.model_validate(T.to_json(r)) for r in recs],
            last_seq=last,
            oldest_seq=oldest,
            capacity=capacity,
        )
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    text = "".join(line + "\n" for line in T.render(recs))
    return PlainTextResponse(text, headers=headers)
