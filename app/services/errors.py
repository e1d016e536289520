"""Errors the service layer raises; the engine's `KvmError` passes through untouched."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: the API layer maps each subclass to one HTTP status."""


class VmNotFound(ServiceError):
    """No live VM with this id (never created, or destroyed)."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no VM with id {vm_id!r}")
        self.vm_id = vm_id


class SnapshotNotFound(ServiceError):
    """No snapshot with this id (for this VM, when restoring)."""

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(f"no snapshot with id {snapshot_id!r}")
        self.snapshot_id = snapshot_id


class PreconditionFailed(ServiceError):
    """`If-Match` named a version that is not the VM's current one (HTTP 412)."""

    def __init__(self, expected: str, current: str) -> None:
        super().__init__(f"If-Match {expected} does not match the current version {current}")
        self.expected = expected
        self.current = current
