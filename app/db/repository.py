"""Queries on VMs, journal records and snapshots. Callers own the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.jsoncodec import json_loads
from app.db.models import JournalRecord, SnapshotRow, VmRow, utcnow


def get_vm(session: Session, vm_id: str, *, lock: bool = False) -> VmRow | None:
    """The VM row; `lock` takes its row lock until the commit (SQLite: no-op, its writers
    are serialised by BEGIN IMMEDIATE).

    FOR NO KEY UPDATE rather than FOR UPDATE: we never change the key, and inserts of
    snapshot and journal rows (their foreign key takes KEY SHARE) need not wait for us.
    `populate_existing` so a row already in the session is re-read, not served from it.
    """
    stmt = select(VmRow).where(VmRow.id == vm_id).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    return session.execute(stmt).scalar_one_or_none()


class VmHead(NamedTuple):
    """What a call needs of the VM row: its version, whether it is deleted, its tenant (not
    the JSON columns, which a call never reads)."""

    last_seq: int
    deleted: bool
    tenant: str


def vm_head(session: Session, vm_id: str, *, lock: bool = False) -> VmHead | None:
    """The VM's head, through Core (no ORM identity, no JSON decoding); `lock` as in `get_vm`."""
    v = VmRow.__table__.c
    stmt = select(v.last_seq, v.deleted, v.tenant).where(v.id == vm_id)
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    row = session.connection().execute(stmt).first()
    return None if row is None else VmHead(int(row[0]), bool(row[1]), str(row[2]))


def list_vms(
    session: Session, *, limit: int, after: str | None, tenant: str | None
) -> Sequence[VmRow]:
    stmt = select(VmRow).where(VmRow.deleted.is_(False)).order_by(VmRow.id).limit(limit)
    if after is not None:
        stmt = stmt.where(VmRow.id > after)
    if tenant is not None:
        stmt = stmt.where(VmRow.tenant == tenant)
    return session.execute(stmt).scalars().all()


def tenant_vms(session: Session, tenant: str) -> Sequence[VmRow]:
    stmt = select(VmRow).where(VmRow.deleted.is_(False), VmRow.tenant == tenant)
    return session.execute(stmt).scalars().all()


def count_tenant_vms(session: Session, tenant: str) -> int:
    stmt = (
        select(func.count())
        .select_from(VmRow)
        .where(VmRow.deleted.is_(False), VmRow.tenant == tenant)
    )
    return int(session.execute(stmt).scalar_one())


def count_tenant_snapshots(session: Session, tenant: str, *, kind: str | None = None) -> int:
    """Snapshots of the tenant's live VMs."""
    stmt = (
        select(func.count())
        .select_from(SnapshotRow)
        .join(VmRow, VmRow.id == SnapshotRow.vm_id)
        .where(VmRow.deleted.is_(False), VmRow.tenant == tenant)
    )
    if kind is not None:
        stmt = stmt.where(SnapshotRow.kind == kind)
    return int(session.execute(stmt).scalar_one())


def vm_summaries(session: Session) -> Sequence[tuple[str, dict[str, Any] | None]]:
    """(id, summary) of every live VM, by id: what /metrics reports without loading VMs."""
    stmt = select(VmRow.id, VmRow.summary).where(VmRow.deleted.is_(False)).order_by(VmRow.id)
    return [(vm_id, summary) for vm_id, summary in session.execute(stmt).all()]


class JournalEntry(NamedTuple):
    """What replay reads of a journal record (never its stored answer, the largest part).
    `args` is the column as the driver hands it (`decode_json` decodes it): JSON text on
    SQLite, where replay keys the operations it parsed by that text."""

    seq: int
    op: str
    args: Any
    error: dict[str, Any] | None
    at: datetime
    meta: dict[str, Any] | None


def journal_after(
    session: Session, vm_id: str, after_seq: int, upto_seq: int | None = None
) -> Sequence[JournalRecord]:
    """Records with `after_seq < seq <= upto_seq`, in order."""
    stmt = (
        select(JournalRecord)
        .where(JournalRecord.vm_id == vm_id, JournalRecord.seq > after_seq)
        .order_by(JournalRecord.seq)
    )
    if upto_seq is not None:
        stmt = stmt.where(JournalRecord.seq <= upto_seq)
    return session.execute(stmt).scalars().all()


# Records replay reads per query: a long journal is read in pages, never all in one result.
REPLAY_PAGE = 4096


def replay_entries(
    session: Session, vm_id: str, after_seq: int, upto_seq: int | None = None
) -> list[JournalEntry]:
    """What replay needs of the records `journal_after` selects, read in pages of
    `REPLAY_PAGE` on the session's bare DBAPI cursor: no ORM, no SQL compilation, never the
    stored answers. JSON columns are decoded with orjson (`args` is left as read); SQLite's
    datetime text (the `DateTime` type's own format, naive UTC) with
    `datetime.fromisoformat`."""
    conn = session.connection()
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    upto = (1 << 63) - 1 if upto_seq is None else upto_seq
    sql = (
        "SELECT seq, op, args, error, at, meta FROM journal "
        f"WHERE vm_id = {mark} AND seq > {mark} AND seq <= {mark} ORDER BY seq LIMIT {mark}"
    )
    out: list[JournalEntry] = []
    cur = conn.connection.cursor()
    try:
        last = after_seq
        while True:
            cur.execute(sql, (vm_id, last, upto, REPLAY_PAGE))
            rows = cur.fetchall()
            for seq, op, args, error, at, meta in rows:
                out.append(
                    JournalEntry(
                        seq,
                        op,
                        args,
                        None if error is None or error == "null" else decode_json(error),
                        datetime.fromisoformat(at) if isinstance(at, str) else at,
                        decode_json(meta),
                    )
                )
            if len(rows) < REPLAY_PAGE:
                return out
            last = int(rows[-1][0])
    finally:
        cur.close()


def decode_json(value: Any) -> Any:
    """A JSON column as the driver hands it: text (SQLite) or already decoded (psycopg)."""
    if isinstance(value, str | bytes):
        return json_loads(value)
    return value


def append_journal(
    session: Session,
    *,
    vm_id: str,
    seq: int,
    op: str,
    args: dict[str, Any],
    result: Any,
    error: dict[str, Any] | None,
    at: datetime | None = None,
    meta: dict[str, Any] | None = None,
) -> JournalRecord:
    rec = JournalRecord(
        vm_id=vm_id,
        seq=seq,
        op=op,
        args=args,
        result=result,
        error=error,
        at=at or utcnow(),
        meta=meta,
    )
    session.add(rec)
    return rec


class JournalRow(NamedTuple):
    """One journal record as the fast append writes it: JSON columns already serialised."""

    seq: int
    op: str
    args: str
    result: str
    error: str
    at: datetime
    meta: str


class JournalWriter:
    """The journal append on a bare DBAPI cursor: fixed SQL, values already in their stored
    form, no ORM unit of work and no statement compilation. A memslot call appends one record
    and moves its VM row; through the ORM that cost more than the call itself.

    Values are stored exactly as the models' types store them (the dialect's own datetime and
    boolean processors, JSON text), so every reader, replay included, sees the same rows."""

    def __init__(self, dialect: Any) -> None:
        j, v = JournalRecord.__table__.c, VmRow.__table__.c
        self._at = j.at.type.dialect_impl(dialect).bind_processor(dialect) or _same
        self._bool = v.deleted.type.dialect_impl(dialect).bind_processor(dialect) or _same
        self.postgres = dialect.name == "postgresql"
        mark = "?" if dialect.paramstyle == "qmark" else "%s"

        def sql(text: str) -> str:
            return text.replace("?", mark)

        self._head = sql("SELECT last_seq, deleted, tenant FROM vms WHERE id = ?")
        self._insert = sql(
            "INSERT INTO journal (vm_id, seq, op, args, result, error, at, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._move = sql("UPDATE vms SET last_seq = ?, summary = ? WHERE id = ?")
        self._tombstone = sql(
            "UPDATE vms SET last_seq = ?, summary = ?, deleted = ?, deleted_at = ? WHERE id = ?"
        )

    def head(self, cur: Any, vm_id: str, *, lock: bool = False) -> VmHead | None:
        """`vm_head` on the cursor's transaction (`lock`: PostgreSQL's row lock, as there)."""
        cur.execute(self._head + (" FOR NO KEY UPDATE" if lock and self.postgres else ""), (vm_id,))
        row = cur.fetchone()
        return None if row is None else VmHead(int(row[0]), bool(row[1]), str(row[2]))

    def append(
        self,
        cur: Any,
        vm_id: str,
        rows: Sequence[JournalRow],
        *,
        summary: str,
        deleted: bool = False,
    ) -> None:
        """Insert `rows` (in order, consecutive) and move the VM row to the last one."""
        at = self._at
        cur.executemany(
            self._insert,
            [(vm_id, r.seq, r.op, r.args, r.result, r.error, at(r.at), r.meta) for r in rows],
        )
        last = rows[-1].seq
        if deleted:
            cur.execute(self._tombstone, (last, summary, self._bool(True), at(utcnow()), vm_id))
        else:
            cur.execute(self._move, (last, summary, vm_id))


def _same(value: Any) -> Any:
    return value


def get_snapshot(session: Session, snapshot_id: str) -> SnapshotRow | None:
    stmt = select(SnapshotRow).where(SnapshotRow.id == snapshot_id)
    return session.execute(stmt).scalar_one_or_none()


def snapshot_data(session: Session, snapshot_id: str) -> bytes | None:
    stmt = select(SnapshotRow.data).where(SnapshotRow.id == snapshot_id)
    data = session.execute(stmt).scalar_one_or_none()
    return None if data is None else bytes(data)


def list_snapshots(
    session: Session, vm_id: str, *, upto_seq: int | None = None, newest_first: bool = False
) -> Sequence[SnapshotRow]:
    """Snapshot rows (without their data), oldest first unless `newest_first`."""
    stmt = select(SnapshotRow).where(SnapshotRow.vm_id == vm_id)
    if upto_seq is not None:
        stmt = stmt.where(SnapshotRow.seq <= upto_seq)
    if newest_first:
        stmt = stmt.order_by(SnapshotRow.seq.desc(), SnapshotRow.created_at.desc())
    else:
        stmt = stmt.order_by(SnapshotRow.seq, SnapshotRow.created_at)
    return session.execute(stmt).scalars().all()


def newest_snapshot_seq(session: Session, vm_id: str) -> int:
    stmt = select(func.max(SnapshotRow.seq)).where(SnapshotRow.vm_id == vm_id)
    return int(session.execute(stmt).scalar_one_or_none() or 0)


def prune_snapshots(session: Session, vm_id: str, *, keep: int) -> int:
    """Drop all but the `keep` newest automatic (auto/shutdown) snapshots; manual ones stay."""
    stmt = (
        select(SnapshotRow.id)
        .where(SnapshotRow.vm_id == vm_id, SnapshotRow.kind.in_(("auto", "shutdown")))
        .order_by(SnapshotRow.seq.desc(), SnapshotRow.created_at.desc())
        .offset(keep)
    )
    old = session.execute(stmt).scalars().all()
    if old:
        session.execute(delete(SnapshotRow).where(SnapshotRow.id.in_(old)))
    return len(old)


# --- retention -------------------------------------------------------------------------


def get_vm_any(session: Session, vm_id: str) -> VmRow | None:
    return session.get(VmRow, vm_id)


def delete_snapshot(session: Session, snapshot_id: str) -> None:
    session.execute(delete(SnapshotRow).where(SnapshotRow.id == snapshot_id))


def count_snapshots(session: Session, vm_id: str, *, kind: str | None = None) -> int:
    stmt = select(func.count()).select_from(SnapshotRow).where(SnapshotRow.vm_id == vm_id)
    if kind is not None:
        stmt = stmt.where(SnapshotRow.kind == kind)
    return int(session.execute(stmt).scalar_one())


def first_journal_seq(session: Session, vm_id: str) -> int | None:
    stmt = select(func.min(JournalRecord.seq)).where(JournalRecord.vm_id == vm_id)
    value = session.execute(stmt).scalar_one_or_none()
    return None if value is None else int(value)


def count_journal(session: Session, vm_id: str, after_seq: int, upto_seq: int) -> int:
    stmt = (
        select(func.count())
        .select_from(JournalRecord)
        .where(
            JournalRecord.vm_id == vm_id,
            JournalRecord.seq > after_seq,
            JournalRecord.seq <= upto_seq,
        )
    )
    return int(session.execute(stmt).scalar_one())


def prune_journal(session: Session, vm_id: str, *, upto_seq: int) -> int:
    """Delete the VM's records with `seq <= upto_seq`; how many went."""
    res = session.execute(
        delete(JournalRecord).where(JournalRecord.vm_id == vm_id, JournalRecord.seq <= upto_seq)
    )
    return int(getattr(res, "rowcount", 0) or 0)


def purge_vm_data(session: Session, vm_id: str) -> tuple[int, int]:
    """Delete all of a VM's journal records and snapshots: (records, snapshots) deleted."""
    recs = session.execute(delete(JournalRecord).where(JournalRecord.vm_id == vm_id))
    snaps = session.execute(delete(SnapshotRow).where(SnapshotRow.vm_id == vm_id))
    return int(getattr(recs, "rowcount", 0) or 0), int(getattr(snaps, "rowcount", 0) or 0)


def delete_vm_row(session: Session, vm_id: str) -> None:
    session.execute(delete(VmRow).where(VmRow.id == vm_id))


def vm_rows(session: Session, *, deleted: bool) -> Sequence[VmRow]:
    stmt = select(VmRow).where(VmRow.deleted.is_(deleted)).order_by(VmRow.id)
    return session.execute(stmt).scalars().all()


def has_data(session: Session, vm_id: str) -> bool:
    j = select(JournalRecord.seq).where(JournalRecord.vm_id == vm_id).limit(1)
    sn = select(SnapshotRow.id).where(SnapshotRow.vm_id == vm_id).limit(1)
    return session.execute(j).first() is not None or session.execute(sn).first() is not None


def snapshot_at(session: Session, vm_id: str, seq: int) -> SnapshotRow | None:
    """A snapshot of the VM taken exactly after record `seq` (the newest such)."""
    stmt = (
        select(SnapshotRow)
        .where(SnapshotRow.vm_id == vm_id, SnapshotRow.seq == seq)
        .order_by(SnapshotRow.created_at.desc())
        .limit(1)
    )
    return session.execute(stmt).scalar_one_or_none()
