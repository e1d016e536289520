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
    """`If-Match` named a version that is not the VM's current one (HTTP 412); `current` is
    the VM's ETag, which the answer carries."""

    # The client's header is echoed, but never more of it than this.
    SHOWN_MAX = 100

    def __init__(self, expected: str, current: str) -> None:
        shown = (
            expected if len(expected) <= self.SHOWN_MAX else expected[: self.SHOWN_MAX - 1] + "…"
        )
        super().__init__(f"If-Match {shown} does not match the current version {current}")
        self.expected = expected
        self.current = current


class ForkMismatch(ServiceError):
    """A fork asked for a VM type, vCPU count or paging depth other than its snapshot's VM
    has: a fork takes them from the snapshot (HTTP 422)."""

    def __init__(self, fields: dict[str, tuple[int, int]]) -> None:
        # field -> (requested, the snapshot's VM's)
        said = ", ".join(f"{k}={given} (snapshot: {src})" for k, (given, src) in fields.items())
        super().__init__(f"a fork takes vm_type, vcpus and paging_levels from its snapshot: {said}")
        self.fields = fields


class ServiceUnavailable(ServiceError):
    """The database did not answer (outage, refused connection): retry later (HTTP 503)."""

    def __init__(self, reason: str) -> None:
        # The reason (driver text: hosts, ports, database names) is for the log, not for
        # messages that may reach a client.
        super().__init__("the database is unavailable")
        self.reason = reason


# A `KvmError` whose call still changed state (`state_changed`) was journaled: the service
# attaches the VM's new ETag to it so the error answer can carry it.
_ETAG_ATTR = "etag"


def attach_etag(error: BaseException, etag: str) -> None:
    setattr(error, _ETAG_ATTR, etag)


def attached_etag(error: BaseException) -> str | None:
    tag = getattr(error, _ETAG_ATTR, None)
    return tag if isinstance(tag, str) else None
