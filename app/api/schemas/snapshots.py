"""Snapshots of a VM's engine state."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.api.schemas.common import Answer, Body


class Snapshot(Answer):
    id: str
    vm_id: str
    seq: int = Field(description="The journal sequence number whose state it holds.")
    kind: Literal["manual", "auto", "shutdown"] = Field(
        description="`manual` (POST …/snapshots), `auto` (every N records or bytes of work, "
        "and a fork's or restore's starting state), `shutdown` (taken when the service stops)."
    )
    size: int = Field(description="Bytes stored.")
    checksum: str = Field(description="SHA-256 of the stored bytes, hex.")
    created_at: datetime = Field(description="RFC 3339, UTC.")
    label: str | None = Field(description="The name given when it was taken, or null.")


class SnapshotCreate(Body):
    label: str | None = Field(
        default=None, max_length=100, description="A name for the snapshot (optional)."
    )
