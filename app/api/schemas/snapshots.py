"""Snapshots of a VM's engine state."""

from __future__ import annotations

from app.api.schemas.common import Open


class Snapshot(Open):
    id: str
