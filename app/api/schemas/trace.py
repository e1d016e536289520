"""The kvmmmu trace as data (`GET …/trace?format=json`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.api.schemas.common import Answer


class TraceRecord(Answer):
    """One tracepoint hit: what `trace-cmd report` prints after the event name is `text`."""

    seq: int = Field(description="Position in the VM's trace, increasing; resume with `after`.")
    at: datetime = Field(description="When (RFC 3339, UTC): the time of the journaled call.")
    cpu: int | None = Field(description="The vCPU the work ran on; null for a VM ioctl.")
    event: str = Field(description="The tracepoint: `kvm_tdp_mmu_spte_changed`, …")
    text: str = Field(description="The tracepoint's TP_printk text (mmutrace.h).")


class TraceLog(Answer):
    """The records kept, oldest first, after `after` and filtered by `events`."""

    records: list[TraceRecord]
    last_seq: int = Field(description="The newest record's seq (0: none yet).")
    oldest_seq: int = Field(description="The oldest record still kept (older ones were dropped).")
    capacity: int = Field(description="Records the VM keeps (VKMMU_TRACE_RECORDS).")
