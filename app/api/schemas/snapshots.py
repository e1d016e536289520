"""Snapshots of a VM's engine state."""

from __future__ import annotations

from pydantic import Field

from app.api.schemas.common import Body, Open


class Snapshot(Open):
    id: str
    label: str | None = Field(default=None, description="The name given when it was taken.")


class SnapshotCreate(Body):
    label: str | None = Field(
        default=None, max_length=100, description="A name for the snapshot (optional)."
    )
