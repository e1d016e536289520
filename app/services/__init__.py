"""Use cases: the VM registry, per-VM locks, the journal, snapshots and replay."""

from app.services.errors import PreconditionFailed, ServiceError, SnapshotNotFound, VmNotFound
from app.services.vms import VmService, build_service

__all__ = [
    "PreconditionFailed",
    "ServiceError",
    "SnapshotNotFound",
    "VmNotFound",
    "VmService",
    "build_service",
]
