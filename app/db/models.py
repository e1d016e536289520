"""SQLAlchemy 2 typed models: VMs, their journal, their snapshots.

The journal is the source of truth; a snapshot is the engine state at one journal
sequence number. u64 values (addresses, sizes, SPTEs) only ever appear inside the JSON
columns, where they are kept as exact integers: no u64 is stored in a (signed) BIGINT.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so Alembic migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LEN = 40
LABEL_LEN = 100
SNAPSHOT_KINDS = ("auto", "manual", "shutdown")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class VmRow(Base):
    """One VM. `last_seq` is the sequence number of its newest journal record (its version)."""

    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    # Tenant isolation comes later; every VM already carries one so it needs no data migration.
    tenant: Mapped[str] = mapped_column(
        String(64), index=True, default="default", server_default=text("'default'")
    )
    vm_type: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    paging_levels: Mapped[int] = mapped_column(Integer)
    # How the VM came to be: the `Vm.create` arguments, or the snapshot it was forked from.
    create_args: Mapped[dict[str, Any]] = mapped_column(JSON)
    # `vm.info()` at `last_seq`: lets lists and GETs answer without loading the engine state.
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A deleted VM is a tombstone: its journal and snapshots are purged (see `vkmmu gc`),
    # the row itself after `VKMMU_RETENTION_S`.
    deleted: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), index=True
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class JournalRecord(Base):
    """One accepted mutating call (or a rejected one that still changed state, with its error)."""

    __tablename__ = "journal"

    vm_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    op: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What replay must reuse rather than re-measure: {"durations": [zap event duration_us, …]}.
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class SnapshotRow(Base):
    """The engine state of `vm_id` after journal record `seq` (`app.engine.codec` bytes)."""

    __tablename__ = "snapshots"
    __table_args__ = (
        CheckConstraint("kind IN ('auto', 'manual', 'shutdown')", name="kind"),
        Index("ix_snapshots_vm_id_seq", "vm_id", "seq"),
    )

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("vms.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    size: Mapped[int] = mapped_column(BigInteger)
    # sha256 of `data`: catches a truncated or altered blob before the codec even looks at it.
    checksum: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    # The client's name for a manual snapshot (migration 0003).
    label: Mapped[str | None] = mapped_column(String(LABEL_LEN))
    # Deferred: listing snapshots must not read megabytes of state.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class TokenRow(Base):
    """A tenant's API token. Only its keyed hash is stored (HMAC-SHA256 under the server's
    token key, see `AuthKeyRow`): the token itself is shown once, when it is created."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    # "read", or "read write" (space-separated, OAuth style).
    scopes: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(LABEL_LEN))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuthKeyRow(Base):
    """The key token hashes are made with, when `VKMMU_TOKEN_SECRET` does not give one:
    created once, shared by every process on the database."""

    __tablename__ = "auth_keys"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
