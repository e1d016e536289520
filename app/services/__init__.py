"""Use cases: the VM registry, per-VM locks, the journal, snapshots and replay."""

from app.services.errors import (
    ForkMismatch,
    PreconditionFailed,
    ServiceError,
    ServiceUnavailable,
    SnapshotNotFound,
    VmNotFound,
)
from app.services.vms import VmService, build_service

__all__ = [
    "ForkMismatch",
    "PreconditionFailed",
    "ServiceError",
    "ServiceUnavailable",
    "SnapshotNotFound",
    "VmNotFound",
    "VmService",
    "build_service",
]
