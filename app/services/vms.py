"""The VM registry: per-VM locks, the journal, snapshots and replay.

Invariants this module keeps:
- The journal is the source of truth. A VM's in-memory state (`VmHandle.vm`) is always the
  state after journal record `VmHandle.applied_seq`; when that can no longer be guaranteed
  (the engine applied a call whose record did not commit, a replay failed) the in-memory VM
  is discarded and rebuilt from the database on next use.
- A mutating call is answered only after its record is committed, in the same transaction
  that moves the VM row's `last_seq` (its version, and its ETag).
- Before working on a VM, a process catches up with records other processes appended
  (several `vkmmu serve` on one PostgreSQL); writers hold the VM row lock while they do.
- On SQLite (one write lock for the whole database) the engine step runs outside any write
  transaction; the record is appended by a short `BEGIN IMMEDIATE` transaction afterwards,
  which redoes the step under the lock if another process moved the VM meanwhile. One VM's
  long call never stalls another VM's write.
- Retention: a deleted VM's journal and snapshots are purged, journals are pruned behind
  snapshots (`gc`); a VM is only ever rebuilt from a base the kept journal continues.

Memory: every byte a client can make a VM hold is reserved in `budget.Ledger` before the
engine runs (ENOMEM past the VM's quota, the service's memory budget or its page-table
budget; see app/services/budget.py). The page tables a call reserved are its table budget:
what the VM holds plus the grant, journaled with the call, so replay runs it under the same
budget and ends in the same state. A reload reserves the state the VM row last counted, a
fork its snapshot's footprint, before building it. At most `max_loaded_vms` VMs stay in
memory; idle ones are evicted least recently used first and reload from their newest
snapshot and the journal.

Threading: each call holds the VM's asyncio lock and runs its whole unit of work (database
transaction and engine call) in one worker thread. The lock is never released while that
thread runs, even when the caller is cancelled, so two calls never touch one VM at once
(the engine is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import repository as repo
from app.db.jsoncodec import json_loads
from app.db.models import SnapshotRow, VmRow, utcnow
from app.db.session import Database
from app.engine.errors import KvmError
from app.engine.host_profile import DEFAULT_HOST
from app.engine.revision import ENGINE_REV
from app.engine.uapi import VmType
from app.services import budget
from app.services.engine_port import TABLE_BYTES, EnginePort, OpLike, Vm, default_engine
from app.services.errors import (
    ForkMismatch,
    PreconditionFailed,
    ServiceUnavailable,
    SnapshotNotFound,
    VmNotFound,
    attach_etag,
)
from app.services.events import EventBus
from app.services.quotas import (
    HELD_KEY,
    TenantQuotas,
    TenantUsage,
    acting_tenant,
    held_split,
    too_many,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# The service's own journal operation (rewind to a snapshot); never sent to the engine.
RESTORE_OP = "restore"
# Results bigger than this (serialised) are journaled as a digest: replay never needs them.
RESULT_INLINE_MAX = 16 * 1024
# Automatic snapshots kept per VM (manual ones are kept until deleted with the VM).
AUTO_SNAPSHOTS_KEPT = 2
# Page-table memory of the whole service (all loaded VMs together), unless configured.
DEFAULT_PAGE_TABLE_BUDGET_BYTES = 4 * 1024 * 1024 * 1024
# VMs held in memory at once; past it the least recently used idle ones are evicted.
DEFAULT_MAX_LOADED_VMS = 64
# Retention: journal records kept behind a VM's newest snapshot, how long a deleted VM's row
# stays, manual snapshots per VM, and how often the background gc runs.
DEFAULT_JOURNAL_KEEP = 1000
DEFAULT_RETENTION_S = 7 * 24 * 3600.0
DEFAULT_MAX_MANUAL_SNAPSHOTS = 32
DEFAULT_GC_INTERVAL_S = 300.0
# kvmmmu trace records kept per loaded VM (GET …/trace; ~56 bytes each, grown on use).
DEFAULT_TRACE_RECORDS = 4096
# Where the VM row's summary keeps `vm.stats()` (read by /metrics without loading the VM);
# `HELD_KEY` what the state holds in memory (tenant quotas; what a reload reserves first).
STATS_KEY = "stats"
# A VM's creation defaults (KVM_CREATE_VM with type 0, one vCPU, 4-level EPT).
CREATE_DEFAULTS = {"vm_type": 0, "vcpus": 1, "paging_levels": 4}
HOST_DEFAULTS = DEFAULT_HOST.to_dict()  # a create record names `host` only when it differs

# Database failures that mean "not reachable now", not "this request is wrong": the call is
# answered 503 (retry) instead of 500. Integrity and data errors are bugs or bad input.
_DB_OUTAGE: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,  # no pooled connection came free in time
    sa_exc.DisconnectionError,
)
_DB_NOT_OUTAGE: tuple[type[BaseException], ...] = (sa_exc.IntegrityError, sa_exc.DataError)


def new_id(prefix: str) -> str:
    """Sortable by creation time (ms), unique across processes (40 random bits)."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


def etag(seq: int) -> str:
    return f'"{seq}"'


def etag_matches(if_match: str, seq: int) -> bool:
    """RFC 9110 If-Match: `*`, or a list of entity tags compared strongly: a weak tag
    (`W/"…"`) never matches, nor does anything that is not a quoted tag."""
    current = etag(seq)
    for tag in if_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag == current:
            return True
    return False


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)


# The engine stamps state (zap events) with the call's time. Replay must hand it the very
# same float, so a call's time is fixed once, in whole microseconds (what both databases
# keep exactly), journaled, and converted the same way live and on replay.
def now_us() -> int:
    return time.time_ns() // 1000


def us_to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def datetime_to_us(dt: datetime) -> int:
    if dt.tzinfo is None:  # SQLite hands datetimes back naive; they were stored in UTC
        # Naive arithmetic: an aware subtraction costs ten times as much (replay does one
        # per record).
        return (dt - _EPOCH_NAIVE) // _US
    return (dt - _EPOCH) // _US


def us_to_engine_time(us: int) -> float:
    return us / 1e6


def _iso(dt: datetime) -> str:
    # SQLite hands datetimes back naive; they were stored in UTC.
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_bytes(value: Any) -> bytes:
    """`value` as JSON (orjson; the standard encoder for what orjson refuses, an integer past
    64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value).encode()


def _json_copy(value: Any) -> Any:
    """A private, JSON-only deep copy (what the journal will store, and what replay will see)."""
    return json_loads(_json_bytes(value))


def _result_json(result: Any) -> bytes:
    """What the journal keeps of a result, as JSON: the result, or past `RESULT_INLINE_MAX`
    bytes a summary of it (replay never reads results)."""
    encoded = _json_bytes(result)
    if len(encoded) <= RESULT_INLINE_MAX:
        return encoded
    digest = hashlib.sha256(encoded).hexdigest()
    keys = sorted(result) if isinstance(result, dict) else None
    return _json_bytes({"_summary": True, "bytes": len(encoded), "sha256": digest, "keys": keys})


def _journaled(op: OpLike) -> tuple[dict[str, Any], bytes]:
    """The args a record keeps (a private copy of `op.to_json()`, taken before the call) and
    their JSON."""
    encoded = _json_bytes(op.to_json())
    return json_loads(encoded), encoded


def _error_json(e: KvmError) -> dict[str, Any]:
    return {"errno": e.errno, "errno_name": e.errno_name, "detail": e.detail}


def _is_outage(e: BaseException) -> bool:
    return isinstance(e, _DB_OUTAGE) and not isinstance(e, _DB_NOT_OUTAGE)


def _outage_reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    first = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(orig).__name__}: {first}"[:300]


def _vm_type_name(vm_type: int) -> str:
    try:
        return VmType(vm_type).name
    except ValueError:
        return str(vm_type)


# Stats whose change measures the engine work a record replays: tables and leaf SPTEs.
_WORK_STATS = {"page_tables": TABLE_BYTES, "pages_4k": 8, "pages_2m": 8, "pages_1g": 8}
# Work (bytes journaled + page-table bytes and SPTE bytes changed) after which a VM is
# snapshotted even before `snapshot_every` records: replay after a crash stays bounded.
DEFAULT_SNAPSHOT_WORK_BYTES = 64 * 1024 * 1024

# Worker threads for VM calls: one VM uses at most one at a time (its lock), so this bounds
# how many VMs compute or wait on the database at once.
WORKER_THREADS = 8


@dataclass
class VmHandle:
    """One VM as this process knows it. `vm is None`: not loaded (or discarded).

    Touched only by the holder of `lock` (from the worker thread running its call)."""

    vm_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    vm: Vm | None = None
    applied_seq: int = 0
    snapshot_seq: int = 0
    users: int = 0
    snapshot_task: asyncio.Task[None] | None = None
    # When a call last held the VM (monotonic): the least recently used idle VMs are evicted.
    last_used: float = field(default_factory=time.monotonic)
    # Replay work piled up since the newest snapshot (see `_count_work`), and the stats the
    # last call left (None: unknown, e.g. just loaded).
    work_bytes: int = 0
    work_stats: dict[str, Any] | None = None
    # The VM's tenant, from its row (the byte quotas count what each VM holds by tenant).
    tenant: str | None = None

    def discard(self) -> None:
        self.vm = None
        self.applied_seq = 0
        self.work_stats = None


@dataclass
class _Outcome:
    """What a mutating call's worker thread hands back to the event loop."""

    result: Any
    seq: int
    error: KvmError | None
    # The args journaled, and `vm.info()` right after the call (None once destroyed): what
    # the event streams are told.
    args: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] | None = None
    zapped: bool = True  # False: the call recorded no zap event (none to look for)


class CallFeed(Protocol):
    """Engine calls handed out one at a time (`mutate_many`): each outcome is recorded
    before the next call is asked for."""

    def next_call(self) -> tuple[str, dict[str, Any]] | None: ...

    def record(self, outcome: Any) -> None: ...


class _StopAtFirstError:
    """A `CallFeed` over a fixed list that stops after the first rejected call."""

    def __init__(self, calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.calls = calls
        self.outcomes: list[Any] = []

    def next_call(self) -> tuple[str, dict[str, Any]] | None:
        done = len(self.outcomes)
        if done == len(self.calls) or (done and isinstance(self.outcomes[-1], KvmError)):
            return None
        # Not copied: a batch step only reads it (the engine runs the op built from the
        # args as journaled, see `_batch_steps`).
        return self.calls[done]

    def record(self, outcome: Any) -> None:
        self.outcomes.append(outcome)


@dataclass(slots=True)
class _Step:
    """One engine step of a mutating call, on its way to the journal."""

    at_us: int
    budget: int
    result: Any = None
    raised: KvmError | None = None
    error: dict[str, Any] | None = None
    seq: int = 0
    # What the record costs to store (and replay reads): its args and result, serialised.
    journal_bytes: int = 0
    args_json: bytes = b"{}"
    stats: dict[str, Any] = field(default_factory=dict)
    # Taken right after the step (a batch appends its records after its last step): what
    # replay reuses (durations, budget) and the row's summary of the state.
    meta: dict[str, Any] = field(default_factory=dict)
    # The row's summary after the step, serialised (None: not taken), and the `vm.info()`
    # in it (what the event streams are told).
    summary: bytes | None = None
    info: dict[str, Any] | None = None
    # Whether the engine recorded a zap event (True when the engine cannot tell): the event
    # streams look for zap events in the answer only then.
    zapped: bool = True

    def take_summary(self, vm: Vm) -> None:
        raw = VmService._summary_raw(vm)
        self.summary = _json_bytes(raw)
        self.info = _public_info(raw)


@dataclass
class _BatchGrants:
    """A batch's grants not settled yet (their sums), and what the ledger counted the VM as
    holding when it last settled: together, what the ledger counts for the VM now."""

    settled: int
    bytes: int = 0
    tables: int = 0

    def add(self, grant: budget.Grant) -> None:
        self.bytes += grant.bytes
        self.tables += grant.tables

    def counted(self) -> int:
        return self.settled + self.bytes

    def take(self) -> budget.Grant:
        """All the grants as one, the batch left with none."""
        done = budget.Grant(self.bytes, self.tables)
        self.bytes = self.tables = 0
        return done


class VmService:
    def __init__(
        self,
        database_url: str,
        *,
        snapshot_every: int = 1000,
        snapshot_work_bytes: int = DEFAULT_SNAPSHOT_WORK_BYTES,
        run_migrations: bool = True,
        sqlite_synchronous: str = "normal",
        engine: EnginePort | None = None,
        page_table_budget_bytes: int = DEFAULT_PAGE_TABLE_BUDGET_BYTES,
        max_loaded_vms: int = DEFAULT_MAX_LOADED_VMS,
        journal_keep: int = DEFAULT_JOURNAL_KEEP,
        retention_s: float = DEFAULT_RETENTION_S,
        max_manual_snapshots: int = DEFAULT_MAX_MANUAL_SNAPSHOTS,
        gc_interval_s: float = 0,
        trace_records: int = DEFAULT_TRACE_RECORDS,
        memory_budget_bytes: int = budget.DEFAULT_MEMORY_BUDGET_BYTES,
        vm_memory_budget_bytes: int = budget.DEFAULT_VM_MEMORY_BUDGET_BYTES,
        max_gmem_bytes: int = budget.DEFAULT_MAX_GUEST_MEMFD_BYTES,
        tenant_quotas: TenantQuotas | None = None,
        host_profile: dict[str, bool] | None = None,
    ) -> None:
        # The host profile new VMs get (VKMMU_HOST_*); a VM's own `host` overrides it.
        self.host_defaults: dict[str, bool] = dict(host_profile or {})
        # Page tables all loaded VMs and what-if forks together may hold (in tables).
        self.budget_tables = max(0, page_table_budget_bytes) // TABLE_BYTES
        self.ledger = budget.Ledger(
            memory_budget_bytes, vm_memory_budget_bytes, service_tables=self.budget_tables
        )
        # Per-tenant quotas (app/services/quotas.py) and each VM's tenant, once seen: a VM's
        # tenant never changes.
        self.quotas = tenant_quotas or TenantQuotas()
        self.usage = TenantUsage(self.quotas)
        self._tenants: dict[str, str] = {}
        self.max_gmem_bytes = max_gmem_bytes
        self.database_url = database_url
        self.journal_keep = max(0, journal_keep)
        self.trace_records = max(0, trace_records)
        self.retention_s = max(0.0, retention_s)
        self.max_manual_snapshots = max(0, max_manual_snapshots)
        # Seconds between background gc runs (0: none; `vkmmu serve` sets it).
        self.gc_interval_s = gc_interval_s
        self._gc_task: asyncio.Task[None] | None = None
        self.snapshot_every = snapshot_every
        self.snapshot_work_bytes = snapshot_work_bytes
        self.run_migrations = run_migrations
        self.sqlite_synchronous = sqlite_synchronous
        self._engine = engine
        self.max_loaded_vms = max(1, max_loaded_vms)
        self._db: Database | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._handles: dict[str, VmHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Typed events of committed calls, for /v1/events, the dashboard and /metrics.
        self.events = EventBus()

    # ----------------------------------------------------------------- lifecycle

    @property
    def engine(self) -> EnginePort:
        if self._engine is None:
            self._engine = default_engine()
        return self._engine

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("VmService.start() has not been called")
        return self._db

    async def start(self) -> None:
        if self.run_migrations:
            from app.services.lifecycle import migrate

            await asyncio.to_thread(migrate, self.database_url)
        self._db = Database(self.database_url, sqlite_synchronous=self.sqlite_synchronous)
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="vkmmu-vm")
        self._stopping = False
        if self.gc_interval_s > 0:
            self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())
        await self._run(self._warm_load_path)

    def _warm_load_path(self) -> None:
        """Load a VM that does not exist: SQLAlchemy compiles each statement on its first use,
        tens of ms in all that the first request after a start would pay loading its VM."""
        try:
            with self.db.read() as s:
                with suppress(VmNotFound):
                    self._head(s, "")
                self._row_need(s, "")
                repo.newest_snapshot_seq(s, "")
                with suppress(VmNotFound):
                    self._build(s, "", 0)
        except Exception as e:  # the database may be down: the first load compiles them
            log.debug("load path not warmed: %s", _outage_reason(e))

    async def stop(self) -> None:
        """Finish background snapshots, snapshot every VM changed since its last one, close."""
        if self._db is None:
            return
        self._stopping = True
        self.events.close()
        if self._gc_task is not None:
            self._gc_task.cancel()
            await asyncio.gather(self._gc_task, return_exceptions=True)
            self._gc_task = None
        await self.wait_background()
        for h in list(self._handles.values()):
            if h.vm is not None and h.applied_seq > h.snapshot_seq:
                try:
                    await self.create_snapshot(h.vm_id, kind="shutdown")
                except Exception:
                    log.exception("shutdown snapshot of VM %s failed", h.vm_id)
        self._handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._db.dispose()
        self._db = None

    async def wait_background(self) -> None:
        """Wait for automatic snapshots in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def ready(self) -> dict[str, Any]:
        """Readiness: the database answers and its schema is at Alembic's head."""
        from app.services.lifecycle import current_revision, head_revision

        out: dict[str, Any] = {"loaded_vms": len(self.loaded_vms())}
        if self._db is None:
            return {**out, "ok": False, "database": "not started"}

        def probe() -> str | None:
            with self.db.read() as s:
                s.execute(text("SELECT 1"))
                return current_revision(s.connection())

        try:
            rev = await self._run(probe)
        except Exception as e:  # readiness reports why, it never raises
            # Driver messages name hosts, ports and databases: they go to the log only.
            reason = getattr(e, "reason", None) or _outage_reason(e)
            log.warning("readiness: database unreachable: %s", reason)
            return {**out, "ok": False, "database": "unavailable (unreachable)"}
        head = head_revision()
        ok = rev == head
        return {
            **out,
            "ok": ok,
            "database": "ok",
            "schema": "ok" if ok else f"at {rev}, expected {head}",
        }

    def evict(self, vm_id: str) -> bool:
        """Drop an idle VM's in-memory state (it reloads lazily); False if it is busy."""
        h = self._handles.get(vm_id)
        if h is None or h.lock.locked() or h.users:
            return False
        del self._handles[vm_id]
        self.ledger.forget(vm_id)
        return True

    def loaded_vms(self) -> dict[str, Vm]:
        return {vm_id: h.vm for vm_id, h in self._handles.items() if h.vm is not None}

    def _evict_over_limit(self) -> None:
        """Keep at most `max_loaded_vms` VMs in memory: evict the least recently used idle
        ones (they reload lazily from their snapshot and journal)."""
        loaded = [h for h in self._handles.values() if h.vm is not None]
        excess = len(loaded) - self.max_loaded_vms
        if excess <= 0:
            return
        for h in sorted(loaded, key=lambda h: h.last_used):
            if excess <= 0:
                break
            # A pending automatic snapshot would only load it again.
            if h.snapshot_task is None and self.evict(h.vm_id):
                excess -= 1

    async def vm_summaries(self) -> dict[str, dict[str, Any]]:
        """Every live VM's row summary (`vm.info()` and stats at its last call), by id."""

        def work() -> dict[str, dict[str, Any]]:
            with self.db.read() as s:
                return {vm_id: summary or {} for vm_id, summary in repo.vm_summaries(s)}

        return await self._run(work)

    async def stats_summaries(self) -> dict[str, dict[str, Any]]:
        """Every live VM's stats as of its last journaled call (from the VM rows: no VM is
        loaded). A VM whose row predates the summary answers from memory if loaded."""

        def work() -> dict[str, dict[str, Any] | None]:
            with self.db.read() as s:
                return {
                    vm_id: (summary or {}).get(STATS_KEY) for vm_id, summary in repo.vm_summaries(s)
                }

        out: dict[str, dict[str, Any]] = {}
        loaded = self.loaded_vms()
        for vm_id, stats in (await self._run(work)).items():
            if stats is not None:
                out[vm_id] = stats
            elif vm_id in loaded:
                try:
                    out[vm_id], _ = await self.read(vm_id, lambda v: v.stats())
                except VmNotFound:
                    pass  # deleted meanwhile
        return out

    # ----------------------------------------------------------------- VMs

    async def create_vm(
        self,
        *,
        name: str | None,
        vm_type: int | None = None,
        vcpus: int | None = None,
        paging_levels: int | None = None,
        from_snapshot: str | None = None,
        tenant: str = "default",
        td_lifecycle: bool = False,
        only_tenant: str | None = None,
        host: dict[str, bool] | None = None,
    ) -> tuple[dict[str, Any], str]:
        """KVM_CREATE_VM, or a fork of a snapshot. A fork is its snapshot's kind of VM:
        `vm_type`, `vcpus`, `paging_levels` may be left out (None) or must be the source
        VM's (ForkMismatch otherwise). A snapshot of a deleted VM is gone (SnapshotNotFound),
        as is one of another tenant's VM when `only_tenant` is given."""
        requested = {"vm_type": vm_type, "vcpus": vcpus, "paging_levels": paging_levels}
        acting = acting_tenant.get()

        row_id = new_id("vm-")

        def work() -> tuple[VmRow, Vm]:
            create_args: dict[str, Any]
            if from_snapshot is not None:
                with self.db.read() as s:
                    snap = repo.get_snapshot(s, from_snapshot)
                    src = None if snap is None else repo.get_vm(s, snap.vm_id)
                    if snap is None or src is None or src.deleted:
                        raise SnapshotNotFound(from_snapshot)
                    if only_tenant is not None and src.tenant != only_tenant:
                        raise SnapshotNotFound(from_snapshot)
                    source = {
                        "vm_type": src.vm_type,
                        "vcpus": src.vcpus,
                        "paging_levels": src.paging_levels,
                    }
                    wrong = {
                        k: (v, source[k])
                        for k, v in requested.items()
                        if v is not None and v != source[k]
                    }
                    if wrong:
                        raise ForkMismatch(wrong)
                    vm = self._reserved_build(
                        row_id,
                        self._snapshot_need(s, snap),
                        lambda: self._state_of_snapshot(s, snap.vm_id, snap.id, snap.seq),
                    )
                kind = source
                create_args = {
                    "from_snapshot": snap.id,
                    "source_vm": snap.vm_id,
                    "source_seq": snap.seq,
                }
            else:
                kind = {k: CREATE_DEFAULTS[k] if v is None else v for k, v in requested.items()}
                create_args = {**kind, "name": name}
                # Only a TD that goes through KVM_TDX_INIT_VM … FINALIZE_VM says so: a record
                # without the key is a TD runnable from creation, as every older one is.
                extra: dict[str, Any] = {"td_lifecycle": True} if td_lifecycle else {}
                # The behaviour revision is journaled: a record without it replays as
                # revision 1, the behaviour of every VM created before revisions.
                extra["engine_rev"] = ENGINE_REV
                profile = {**self.host_defaults, **(host or {})}
                if any(HOST_DEFAULTS.get(k) != v for k, v in profile.items()):
                    # The resolved profile is journaled: replay never depends on VKMMU_HOST_*.
                    extra["host"] = {**HOST_DEFAULTS, **profile}
                create_args.update(extra)
                # KvmError (unsupported type, bad levels) passes through; nothing is stored.
                vm = self.engine.create(**kind, name=name, **extra)
            row = VmRow(
                id=row_id,
                name=name,
                tenant=tenant,
                vm_type=kind["vm_type"],
                vcpus=kind["vcpus"],
                paging_levels=kind["paging_levels"],
                create_args=create_args,
                summary=self._summary(vm),
                created_at=utcnow(),
                deleted=False,
                last_seq=0,
            )
            own: SnapshotRow | None = None
            try:
                if from_snapshot is not None:
                    # A fork keeps its own copy of its starting state: it never depends on
                    # its source's snapshot or journal, which retention may delete.
                    own = self._snapshot_row(row.id, 0, self.engine.dumps(vm), "auto", None)
                with self.db.write() as s:
                    if acting is not None:  # counted under the write lock (SQLite: exact)
                        have = repo.count_tenant_vms(s, acting)
                        if have >= self.quotas.max_vms:
                            raise too_many("VMs", have, self.quotas.max_vms, "VKMMU_TENANT_MAX_VMS")
                    s.add(row)
                    if own is not None:
                        s.flush()  # the VM row first: the snapshot's foreign key names it
                        s.add(own)
            except BaseException:
                self.ledger.forget(row_id)  # a fork's state was counted as it was built
                raise
            return row, vm

        row, vm = await self._run(work)
        self._tenants[row.id] = row.tenant
        self.usage.settle(row.tenant, row.id, held_split(vm))
        self._handles[row.id] = VmHandle(row.id, vm=vm, tenant=row.tenant)
        self._settle_held(row.id, vm)
        self._evict_over_limit()
        info = self._info(row)
        self.events.publish("vm_created", row.id, {"vm": info})
        return info, etag(0)

    async def list_vms(
        self, *, limit: int, cursor: str | None, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """VMs ordered by id; the cursor is the last id of the previous page."""
        limit = max(1, limit)

        def work() -> Sequence[VmRow]:
            with self.db.read() as s:
                return repo.list_vms(s, limit=limit + 1, after=cursor, tenant=tenant)

        rows = await self._run(work)
        for r in rows:
            self._tenants[r.id] = r.tenant
        items = [self._info(r) for r in rows[:limit]]
        next_cursor = rows[limit - 1].id if len(rows) > limit else None
        return items, next_cursor

    async def get_vm(self, vm_id: str) -> tuple[dict[str, Any], str]:
        # Answered from the row (its summary is `vm.info()` at `last_seq`): no engine load.
        def work() -> VmRow:
            with self.db.read() as s:
                return self._live_row(s, vm_id)

        row = await self._run(work)
        return self._info(row), etag(row.last_seq)

    async def delete_vm(self, vm_id: str, *, if_match: str | None = None) -> dict[str, Any]:
        """Destroy the VM; its journal and snapshots are deleted with it (the row stays as a
        tombstone until `retention_s` passed). Forks journaled before forks kept their own
        starting state may still need the VM's snapshots: then `gc` purges them later."""
        op = self.engine.parse("destroy", {})
        result, _ = await self._mutate(vm_id, op, if_match=if_match, destroy=True)
        self.events.publish("vm_deleted", vm_id, {})
        self.events.end_vm(vm_id)
        self.usage.forget(vm_id)
        try:
            await self._run(self._purge_tombstone, vm_id)
        except Exception:  # the destroy is committed; gc purges what is left
            log.warning("purging the data of deleted VM %s deferred to gc", vm_id, exc_info=True)
        return dict(result)

    # ----------------------------------------------------------------- calls

    async def mutate(
        self,
        vm_id: str,
        op: OpLike | str,
        args: dict[str, Any] | None = None,
        *,
        if_match: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Apply one engine operation, journal it (`op.name`, `op.to_json()`), commit, answer
        (result, ETag). A name with JSON `args` is parsed first, as a journal record is.

        A `KvmError` that changed nothing is re-raised and leaves no record. One with
        `state_changed` is journaled with its error, then re-raised after the commit.
        """
        if isinstance(op, str):
            op = self.engine.parse(op, args)
        if op.name in (RESTORE_OP, "destroy"):
            # Both have their own entry points, which keep the VM row consistent.
            raise KvmError(errno.EINVAL, f"operation {op.name!r} is not available through mutate()")
        return await self._mutate(vm_id, op, if_match=if_match, destroy=False)

    async def mutate_many(
        self, vm_id: str, feed: CallFeed, *, max_calls: int = 1000, if_match: str | None = None
    ) -> tuple[int, str]:
        """Apply the calls `feed` hands out, in order, under one lock, each journaled as its
        own record exactly as `mutate` journals it, the batch's records in one transaction
        (trace replay: one commit per batch instead of one per call). `feed.record` receives
        each outcome (the result, or the `KvmError`: a rejected call does not stop the
        batch) before the next call is asked for, so what comes next may depend on it. Stops
        after `max_calls` calls or when the feed has none left. `if_match` as in `mutate`,
        checked before the first call. Answers (calls applied, ETag).

        On SQLite the engine steps run outside any write transaction, as `mutate`'s do; the
        records are appended by one short transaction after the last step. If another
        process appended to the VM meanwhile, nothing of the batch is journaled, the VM is
        rebuilt from the journal on next use, and the batch answers EBUSY (409): the feed
        has seen outcomes that cannot be redone."""
        async with self._locked(vm_id) as h:
            n, seq, _ = await self._run(
                self._mutate_many_sync, h, feed, max(1, max_calls), if_match
            )
            self._maybe_auto_snapshot(h)
        return n, etag(seq)

    async def mutate_batch(
        self, vm_id: str, calls: list[tuple[str, dict[str, Any]]], *, if_match: str | None = None
    ) -> tuple[list[Any], str]:
        """Apply `calls` in order under one lock and one transaction, stopping at the first
        one KVM rejects: what the same ioctls issued one by one would leave (each applied
        call is its own journal record and publishes its events). Answers each attempted
        call's outcome (its result, or the `KvmError`), in order, and the ETag."""
        feed = _StopAtFirstError(calls)
        async with self._locked(vm_id) as h:
            _, seq, steps = await self._run(
                self._mutate_many_sync, h, feed, max(1, len(calls)), if_match
            )
            info = None if h.vm is None else h.vm.info()
            # An answer that is no KvmError is the step journaled without one, in order.
            zapped = iter([step.zapped for _op, _args, step in steps if step.raised is None])
            self.events.publish_calls(  # committed: tell the streams, in order
                vm_id,
                (
                    (name, args, out, next(zapped))
                    for (name, args), out in zip(calls, feed.outcomes, strict=False)
                    if not isinstance(out, KvmError)
                ),
                info,
            )
            self._maybe_auto_snapshot(h)
        return feed.outcomes, etag(seq)

    def _mutate_many_sync(
        self, h: VmHandle, feed: CallFeed, max_calls: int, if_match: str | None
    ) -> tuple[int, int, list[tuple[OpLike, dict[str, Any], _Step]]]:
        split = self.db.sqlite
        touched = False
        steps: list[tuple[OpLike, dict[str, Any], _Step]] = []
        try:
            with self.db.read() if split else self.db.write() as s:
                head = self._head(s, h.vm_id, lock=not split)
                if if_match is not None and not etag_matches(if_match, head.last_seq):
                    raise PreconditionFailed(if_match, etag(head.last_seq))
                vm = self._catch_up(s, h, head.last_seq)
                base_seq = seq = head.last_seq
                if not split:
                    touched = True
                    n = self._batch_steps(h, vm, feed, max_calls, steps)
                    if steps:
                        with self.db.cursor_of(s) as cur:
                            seq = self._append(cur, h, head, vm, steps, destroy=False)
            if split:
                touched = True
                n = self._batch_steps(h, vm, feed, max_calls, steps)
                if steps:
                    # The short write transaction: a check, the batch's inserts, commit.
                    with self.db.raw_write() as cur:
                        head = self._raw_head(cur, h.vm_id)
                        if head.last_seq != base_seq:
                            h.discard()
                            raise KvmError(
                                errno.EBUSY,
                                "another process changed the VM during this batch; nothing "
                                "of the batch was journaled",
                            )
                        seq = self._append(cur, h, head, vm, steps, destroy=False)
        except BaseException as e:
            if touched and not isinstance(e, KvmError):
                h.discard()
            raise
        for _op, _args, step in steps:
            self._count_work(h, vm, step)
        h.applied_seq = seq
        return n, seq, steps

    def _batch_steps(
        self,
        h: VmHandle,
        vm: Vm,
        feed: CallFeed,
        max_calls: int,
        steps: list[tuple[OpLike, dict[str, Any], _Step]],
    ) -> int:
        """Run the feed's calls on the engine (no database work); the steps to journal go
        to `steps`, each with what its record keeps of the state right after it (the row's
        summary only after the last one: the row keeps the batch's end state). Answers the
        calls applied."""
        n = 0
        # The ledger learns what the VM holds once, after the last step; a tenant token's
        # calls settle each step (its quota check must see the steps before).
        held = _BatchGrants(self.ledger.held(h.vm_id)) if acting_tenant.get() is None else None
        try:
            while n < max_calls and (call := feed.next_call()) is not None:
                name, args = call  # read only
                if name in (RESTORE_OP, "destroy"):
                    feed.record(KvmError(errno.EINVAL, f"{name!r} is not available here"))
                    continue
                n += 1
                try:
                    op = self.engine.parse(name, args)
                    journaled, encoded = _journaled(op)
                    if journaled != args:  # defaults filled, or values JSON gives otherwise:
                        op = self.engine.parse(name, journaled)  # run what replay will run
                    step = self._engine_step(h, vm, op, journaled, held)
                except KvmError as e:
                    feed.record(e)  # nothing changed: no record, as in `mutate`
                    continue
                step.args_json = encoded
                feed.record(step.raised if step.raised is not None else step.result)
                steps.append((op, journaled, step))
        finally:
            if held is not None and held.bytes:
                self._settle_steps(h, vm, held)
        if steps:
            steps[-1][2].take_summary(vm)
        return n

    async def _mutate(
        self, vm_id: str, op: OpLike, *, if_match: str | None, destroy: bool
    ) -> tuple[Any, str]:
        async with self._locked(vm_id) as h:
            out = await self._run(self._mutate_sync, h, op, if_match, destroy)
            if out.error is None:  # committed: tell the streams (under the lock: in order)
                self.events.publish_calls(
                    vm_id, [(op.name, out.args, out.result, out.zapped)], out.info
                )
            if destroy:
                self._handles.pop(vm_id, None)
            else:
                self._maybe_auto_snapshot(h)
        if out.error is not None:
            # Journaled: the client must learn the version it moved the VM to.
            attach_etag(out.error, etag(out.seq))
            raise out.error
        return out.result, etag(out.seq)

    def _mutate_sync(
        self, h: VmHandle, op: OpLike, if_match: str | None, destroy: bool
    ) -> _Outcome:
        """One mutating call. PostgreSQL: one transaction holding the VM row's lock (other
        VMs' rows stay free). SQLite has one write lock for the whole database, so the engine
        step runs outside any write transaction and the record is appended by a short one
        afterwards (the VM lock orders calls within this process). If another process
        appended to this VM meanwhile, the step is redone once more under the write lock, as
        on PostgreSQL: two processes writing one VM make progress, never livelock."""
        # Taken before the call: the journal keeps the operation as it came in.
        args, encoded = _journaled(op)
        out = self._mutate_once(h, op, args, encoded, if_match, destroy, split=self.db.sqlite)
        if out is None:
            out = self._mutate_once(h, op, args, encoded, if_match, destroy, split=False)
        assert out is not None  # an unsplit call never conflicts: it holds the lock
        return out

    def _mutate_once(
        self,
        h: VmHandle,
        op: OpLike,
        args: dict[str, Any],
        encoded: bytes,
        if_match: str | None,
        destroy: bool,
        *,
        split: bool,
    ) -> _Outcome | None:
        # Set once the engine has been entered: from then on, any failure to commit means
        # memory may hold a change the journal does not.
        touched = False
        try:
            # SQLite, VM loaded and its version known: no read transaction first. The write
            # transaction checks the version the step ran on (another process moved the
            # VM: the step is forgotten and redone under the lock, as when the read was done).
            loaded = split and h.vm is not None and h.tenant is not None
            if loaded and if_match is not None and not etag_matches(if_match, h.applied_seq):
                loaded = False  # the precondition is answered from the row, not from memory
            if loaded:
                assert h.vm is not None
                vm, base_seq = h.vm, h.applied_seq
            else:
                with self.db.read() if split else self.db.write() as s:
                    head = self._head(s, h.vm_id, lock=not split)
                    h.tenant = head.tenant
                    if if_match is not None and not etag_matches(if_match, head.last_seq):
                        raise PreconditionFailed(if_match, etag(head.last_seq))
                    vm = self._catch_up(s, h, head.last_seq)
                    base_seq = head.last_seq
                    if not split:
                        touched = True
                        step = self._engine_step(h, vm, op, args)
                        step.args_json = encoded
                        step.take_summary(vm)
                        with self.db.cursor_of(s) as cur:
                            self._append(cur, h, head, vm, [(op, args, step)], destroy)
            if split:
                touched = True
                step = self._engine_step(h, vm, op, args)
                step.args_json = encoded
                step.take_summary(vm)  # before the write lock is taken
                # The short write transaction: BEGIN IMMEDIATE, a check, one insert, commit.
                with self.db.raw_write() as cur:
                    head = self._raw_head(cur, h.vm_id)
                    if head.last_seq != base_seq:
                        # Another process moved the VM: forget this step, redo it.
                        h.discard()
                        return None
                    self._append(cur, h, head, vm, [(op, args, step)], destroy)
        except BaseException as e:
            # A KvmError escaping the engine step changed nothing (one that did is journaled,
            # not raised; a refused reservation never reached the engine): memory is sound.
            if touched and not isinstance(e, KvmError):
                h.discard()
            raise
        h.applied_seq = step.seq
        self._count_work(h, vm, step)
        if destroy:
            h.discard()
        info = None if destroy else step.info
        return _Outcome(step.result, step.seq, step.raised, args, info, step.zapped)

    def _engine_step(
        self,
        h: VmHandle,
        vm: Vm,
        op: OpLike,
        args: dict[str, Any],
        held: _BatchGrants | None = None,
    ) -> _Step:
        """Run the call on the engine (no database work). A `KvmError` that changed nothing
        is re-raised; one with `state_changed` is kept to be journaled. `held`: a batch's
        grants so far, which the batch settles after its last step (None: settled now)."""
        # Reserved before the engine allocates (ENOMEM past a quota: nothing changed).
        need = budget.op_need(vm, op.name, args, max_gmem_bytes=self.max_gmem_bytes)
        acting = acting_tenant.get()
        if acting is not None:  # a tenant token's call: its tenant's byte quotas too
            self.usage.load(acting, functools.partial(self._tenant_summaries, acting))
            # An eager split takes what is free, so only a fault's tables are a need here.
            tables = need.tables * TABLE_BYTES if need.all_tables else 0
            self.usage.check(acting, h.vm_id, need.bytes + tables)
        grant = self._reserve(h, vm, need, held)
        try:
            return self._engine_step_reserved(vm, op, grant.tables)
        finally:
            if held is None:
                self._settle_steps(h, vm, grant)
            else:
                held.add(grant)

    def _reserve(
        self, h: VmHandle, vm: Vm, need: budget.Need, held: _BatchGrants | None
    ) -> budget.Grant:
        """Reserve `need` for a call. A batch's unsettled grants (`held`) stand for what its
        steps made the VM hold: while the VM holds no more than the ledger counts, a grant
        asked now is refused or shortened only where one asked after settling would be too,
        and then it is asked again after settling. So a batch is refused exactly where the
        same calls one by one would be."""
        if held is None:
            return self.ledger.reserve(h.vm_id, need)
        if held.bytes and budget.bytes_held(vm) > held.counted():
            self._settle_steps(h, vm, held)  # allocated past its grants (the trace ring)
        try:
            grant = self.ledger.reserve(h.vm_id, need)
        except KvmError:
            if not held.bytes:
                raise
            self._settle_steps(h, vm, held)
            return self.ledger.reserve(h.vm_id, need)
        if grant.tables < need.tables and held.bytes:  # an eager split takes what is free
            held.add(grant)
            self._settle_steps(h, vm, held)
            grant = self.ledger.reserve(h.vm_id, need)
        return grant

    def _settle_steps(self, h: VmHandle, vm: Vm, held: _BatchGrants | budget.Grant) -> None:
        """The calls that held these grants ended: the ledger (and the tenant's usage) count
        what the VM holds now instead."""
        done = held.take() if isinstance(held, _BatchGrants) else held
        now = budget.bytes_held(vm)
        self.ledger.settle(h.vm_id, done, now, budget.tables_held(vm))
        if isinstance(held, _BatchGrants):
            held.settled = now
        if h.tenant is not None:
            self.usage.settle(h.tenant, h.vm_id, held_split(vm))

    def _engine_step_reserved(self, vm: Vm, op: OpLike, granted_tables: int) -> _Step:
        at_us = now_us()
        # The tables it holds plus those reserved for it: the engine never allocates past
        # them. Journaled with the call: replay must run it under the very same budget.
        budget = self.engine.tables_live(vm) + granted_tables
        self.engine.set_table_budget(vm, budget)
        self.engine.set_trace_records(vm, self.trace_records)
        step = _Step(at_us=at_us, budget=budget)
        events = getattr(vm, "event_seq", None)  # zap events recorded so far
        try:
            step.result = self.engine.apply(vm, op, us_to_engine_time(at_us), None)
        except KvmError as e:
            if not getattr(e, "state_changed", False):
                raise  # the engine guarantees nothing changed
            step.raised, step.error = e, _error_json(e)
        step.zapped = events is None or getattr(vm, "event_seq", None) != events
        step.meta = _meta(vm, budget)
        step.stats = _work_stats(vm)
        return step

    def _append(
        self,
        cur: Any,
        h: VmHandle,
        head: repo.VmHead,
        vm: Vm,
        steps: Sequence[tuple[OpLike, dict[str, Any], _Step]],
        destroy: bool,
    ) -> int:
        """Journal the steps as the records after `head.last_seq` and move the row (its
        version, its summary: the state after the last step), on the transaction's DBAPI
        cursor. Answers the new version."""
        seq = head.last_seq
        rows: list[repo.JournalRow] = []
        for op, _args, step in steps:
            seq += 1
            step.seq = seq
            result = b"null" if step.raised else _result_json(step.result)
            step.journal_bytes = len(step.args_json) + len(result)
            meta = step.meta or _meta(vm, step.budget)
            rows.append(
                repo.JournalRow(
                    seq,
                    op.name,
                    step.args_json.decode(),
                    result.decode(),
                    "null" if step.error is None else _json_bytes(step.error).decode(),
                    us_to_datetime(step.at_us),
                    _json_bytes(meta).decode(),
                )
            )
        last = steps[-1][2]
        summary = last.summary if last.summary is not None else _json_bytes(self._summary_raw(vm))
        self.db.journal.append(cur, h.vm_id, rows, summary=summary.decode(), deleted=destroy)
        return seq

    def _raw_head(self, cur: Any, vm_id: str) -> repo.VmHead:
        """`_head` on a bare cursor, with the row lock."""
        head = self.db.journal.head(cur, vm_id, lock=True)
        if head is None or head.deleted:
            raise VmNotFound(vm_id)
        return head

    async def read(self, vm_id: str, fn: Callable[[Vm], T]) -> tuple[T, str]:
        """Run a read-only query on the up-to-date VM; answer (value, ETag)."""

        def work(h: VmHandle) -> tuple[T, str]:
            with self.db.read() as s:
                head = self._head(s, vm_id)
                vm = self._catch_up(s, h, head.last_seq)
            return fn(vm), etag(h.applied_seq)

        async with self._locked(vm_id) as h:
            return await self._run(work, h)

    # ----------------------------------------------------------------- snapshots

    async def create_snapshot(
        self, vm_id: str, *, kind: str = "manual", label: str | None = None
    ) -> dict[str, Any]:
        """Snapshot the VM at its current version. Under the VM's lock only what must be
        consistent is copied (`EnginePort.capture`); the bytes are made and stored after the
        lock is released, so the VM's calls go on meanwhile."""
        key = f"snapshot:{vm_id}"

        def take(h: VmHandle) -> tuple[int, Any, budget.Grant]:
            with self.db.read() as s:
                head = self._head(s, vm_id)
                if kind == "manual":
                    self._check_manual_cap(s, vm_id)
                vm = self._catch_up(s, h, head.last_seq)
            # The snapshot's bytes (and the copy they are made from) are held until they
            # are stored: reserved first (at most the state it encodes; ENOMEM otherwise).
            engine = self.engine
            copied = engine.capture is not None
            try:
                grant = self.ledger.reserve(key, budget.snapshot_need(vm, copied=copied))
            except KvmError:
                if not copied:
                    raise
                # No room for a copy next to the snapshot: encode from the VM itself, under
                # its lock (the calls wait, as they did before snapshots were copied).
                copied = False
                grant = self.ledger.reserve(key, budget.snapshot_need(vm))
            try:
                capture = engine.capture if copied else None
                copy = capture(vm) if capture is not None else engine.dumps(vm)
            except BaseException:
                self._release(key, grant)
                raise
            return h.applied_seq, copy, grant

        def store(seq: int, copy: Any, grant: budget.Grant) -> tuple[SnapshotRow, int]:
            try:
                encode = self.engine.encode
                data = encode(copy) if encode is not None and not isinstance(copy, bytes) else copy
                snap = self._snapshot_row(vm_id, seq, data, kind, label)
                # A snapshot is the state after record `seq`, which is history: no row lock.
                with self.db.write() as s:
                    if kind == "manual":
                        self._check_manual_cap(s, vm_id)  # again: another call took one?
                    s.add(snap)
                    if kind != "manual":
                        repo.prune_snapshots(s, vm_id, keep=AUTO_SNAPSHOTS_KEPT)
            finally:
                self._release(key, grant)
            return snap, len(data)

        async with self._locked(vm_id) as h:
            seq, copy, grant = await self._run(take, h)
            work_at = h.work_bytes
        snap, size = await self._run(store, seq, copy, grant)
        del copy
        async with self._locked(vm_id) as h:
            if seq >= h.snapshot_seq:
                h.snapshot_seq = seq
                h.work_bytes = max(0, h.work_bytes - work_at)  # what came after still counts
        log.info("snapshot %s of VM %s at seq %d (%s, %d bytes)", snap.id, vm_id, seq, kind, size)
        info = self._snapshot_info(snap)
        self.events.publish("snapshot", vm_id, {"action": "created", "snapshot": info})
        return info

    def _release(self, key: str, grant: budget.Grant) -> None:
        self.ledger.settle(key, grant, 0)
        self.ledger.forget(key)

    def _check_manual_cap(self, s: Session, vm_id: str) -> None:
        if repo.count_snapshots(s, vm_id, kind="manual") >= self.max_manual_snapshots:
            raise KvmError(
                errno.ENOMEM,
                f"the VM has {self.max_manual_snapshots} manual snapshots, the most "
                "VKMMU_MAX_MANUAL_SNAPSHOTS allows: delete one first",
            )
        acting = acting_tenant.get()
        if acting is not None:
            have = repo.count_tenant_snapshots(s, acting, kind="manual")
            if have >= self.quotas.max_snapshots:
                raise too_many(
                    "manual snapshots", have, self.quotas.max_snapshots,
                    "VKMMU_TENANT_MAX_SNAPSHOTS",
                )  # fmt: skip

    @staticmethod
    def _snapshot_row(
        vm_id: str, seq: int, data: bytes, kind: str, label: str | None
    ) -> SnapshotRow:
        return SnapshotRow(
            id=new_id("snap-"),
            vm_id=vm_id,
            seq=seq,
            created_at=utcnow(),
            size=len(data),
            checksum=hashlib.sha256(data).hexdigest(),
            kind=kind,
            label=label,
            data=data,
        )

    async def get_snapshot(self, vm_id: str, snapshot_id: str) -> dict[str, Any]:
        def work() -> SnapshotRow:
            with self.db.read() as s:
                self._live_row(s, vm_id)
                snap = repo.get_snapshot(s, snapshot_id)
                if snap is None or snap.vm_id != vm_id:
                    raise SnapshotNotFound(snapshot_id)
                return snap

        return self._snapshot_info(await self._run(work))

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> str:
        """Delete one of the VM's snapshots, unless the VM's state can no longer be rebuilt
        without it (the journal before it was pruned: EBUSY) or a fork still starts from it."""

        def work() -> str:
            with self.db.write() as s:
                row = self._live_row(s, vm_id, lock=True)
                snap = repo.get_snapshot(s, snapshot_id)
                if snap is None or snap.vm_id != vm_id:
                    raise SnapshotNotFound(snapshot_id)
                first = repo.first_journal_seq(s, vm_id)
                # The oldest state replay can start from: creation, or a snapshot at or after
                # the record before the first one kept.
                earliest = row.last_seq if first is None else first - 1
                if earliest > 0:
                    others = [
                        o
                        for o in repo.list_snapshots(s, vm_id)
                        if o.id != snap.id and o.seq >= earliest
                    ]
                    if not others:
                        raise KvmError(
                            errno.EBUSY,
                            "the VM's journal before this snapshot was pruned: it is the only "
                            "state the VM can be rebuilt from (take a newer snapshot first)",
                        )
                for other in repo.vm_rows(s, deleted=False):
                    ca = other.create_args or {}
                    if ca.get("from_snapshot") == snap.id and not repo.count_snapshots(s, other.id):
                        raise KvmError(errno.EBUSY, f"VM {other.id} was forked from this snapshot")
                repo.delete_snapshot(s, snap.id)
                return etag(row.last_seq)

        return await self._run(work)

    async def list_snapshots(self, vm_id: str) -> list[dict[str, Any]]:
        def work() -> Sequence[SnapshotRow]:
            with self.db.read() as s:
                self._live_row(s, vm_id)
                return repo.list_snapshots(s, vm_id)

        return [self._snapshot_info(sn) for sn in await self._run(work)]

    async def restore_snapshot(
        self, vm_id: str, snapshot_id: str, *, if_match: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """Rewind the VM to a snapshot of its own; journaled as a `restore` record."""

        def check(s: Session) -> tuple[VmRow, SnapshotRow]:
            row = self._live_row(s, vm_id, lock=True)
            if if_match is not None and not etag_matches(if_match, row.last_seq):
                raise PreconditionFailed(if_match, etag(row.last_seq))
            snap = repo.get_snapshot(s, snapshot_id)
            if snap is None or snap.vm_id != vm_id:
                raise SnapshotNotFound(snapshot_id)
            return row, snap

        def attempt(h: VmHandle, split: bool) -> VmRow | None:
            # Decoding a snapshot is engine work: on SQLite it happens before the (short)
            # write transaction, which then checks that nobody moved the VM meanwhile (if one
            # did, the restore is redone under the write lock).
            if split:
                with self.db.read() as s:
                    row, snap = check(s)
                    base_seq = row.last_seq
                    vm = self._state_of_snapshot(s, vm_id, snap.id, snap.seq)
            with self.db.write() as s:
                row, snap = check(s)
                if not split:
                    vm = self._state_of_snapshot(s, vm_id, snap.id, snap.seq)
                elif row.last_seq != base_seq:
                    return None
                seq = row.last_seq + 1
                args = {"snapshot_id": snap.id, "seq": snap.seq}
                repo.append_journal(
                    s, vm_id=vm_id, seq=seq, op=RESTORE_OP, args=args, result=args, error=None
                )
                row.last_seq = seq
                row.summary = self._summary(vm)
                # The state after the restore record, as a snapshot of its own: replay never
                # needs the named snapshot (which may be deleted) or the journal behind it.
                data = repo.snapshot_data(s, snap.id)
                if data is not None:
                    s.add(self._snapshot_row(vm_id, seq, data, "auto", None))
                    repo.prune_snapshots(s, vm_id, keep=AUTO_SNAPSHOTS_KEPT)
            # Only now, after the commit: until then `h` still matched the journal (and if
            # the commit's fate is unknown, catching up replays the restore record, or not).
            h.vm, h.applied_seq = vm, seq
            h.work_stats = None
            return row

        def work(h: VmHandle) -> VmRow:
            row = attempt(h, self.db.sqlite)
            return row if row is not None else attempt(h, False)  # type: ignore[return-value]

        async with self._locked(vm_id) as h:
            row = await self._run(work, h)
            self._maybe_auto_snapshot(h)
        self.events.publish("snapshot", vm_id, {"action": "restored", "snapshot_id": snapshot_id})
        return self._info(row), etag(row.last_seq)

    # ----------------------------------------------------------------- retention

    def _dependents(self, s: Session, vm_id: str) -> list[str]:
        """Live forks of `vm_id` without a snapshot of their own (forked before forks kept
        their starting state): they still rebuild from `vm_id`'s snapshot or journal."""
        out = []
        for row in repo.vm_rows(s, deleted=False):
            if (row.create_args or {}).get("source_vm") == vm_id:
                if not repo.count_snapshots(s, row.id):
                    out.append(row.id)
        return out

    def _purge_tombstone(self, vm_id: str) -> tuple[int, int]:
        """Delete a deleted VM's journal and snapshots unless a fork still needs them."""
        with self.db.write() as s:
            row = repo.get_vm_any(s, vm_id)
            if row is None or not row.deleted or self._dependents(s, vm_id):
                return 0, 0
            return repo.purge_vm_data(s, vm_id)

    async def gc(self) -> dict[str, int]:
        """Reclaim storage: give old forks a starting snapshot of their own, purge deleted
        VMs' journals and snapshots (their rows after `retention_s`), prune each live VM's
        journal behind its newest snapshot beyond `journal_keep` records. Idempotent, safe
        to run in several processes at once."""
        out = {"fork_snapshots": 0, "vms_purged": 0, "rows_removed": 0, "records_pruned": 0}

        def survey() -> tuple[list[str], list[str]]:
            with self.db.read() as s:
                live = repo.vm_rows(s, deleted=False)
                forks = [
                    r.id
                    for r in live
                    if "source_vm" in (r.create_args or {}) and not repo.count_snapshots(s, r.id)
                ]
                dead = [r.id for r in repo.vm_rows(s, deleted=True)]
            return forks, dead

        forks, dead = await self._run(survey)
        for fork in forks:
            try:
                await self.create_snapshot(fork, kind="auto")
                out["fork_snapshots"] += 1
            except VmNotFound:
                pass
        cutoff = utcnow() - timedelta(seconds=self.retention_s)

        def purge(vm_id: str) -> None:
            recs, snaps = self._purge_tombstone(vm_id)
            if recs or snaps:
                out["vms_purged"] += 1
            with self.db.write() as s:
                row = repo.get_vm_any(s, vm_id)
                if row is None or not row.deleted or repo.has_data(s, vm_id):
                    return
                deleted_at = row.deleted_at
                if deleted_at is not None and deleted_at.tzinfo is None:
                    deleted_at = deleted_at.replace(tzinfo=UTC)
                if deleted_at is None or deleted_at <= cutoff:
                    repo.delete_vm_row(s, vm_id)
                    out["rows_removed"] += 1

        for vm_id in dead:
            await self._run(purge, vm_id)

        def live_ids() -> list[str]:
            with self.db.read() as s:
                return [r.id for r in repo.vm_rows(s, deleted=False)]

        for vm_id in await self._run(live_ids):
            out["records_pruned"] += await self._run(self._prune_journal, vm_id)
        if any(out.values()):
            log.info("gc: %s", out, extra={"gc": out})
        return out

    def _prune_journal(self, vm_id: str) -> int:
        """Delete records behind the VM's newest snapshot, keeping the last `journal_keep`."""
        with self.db.write() as s:
            row = repo.get_vm(s, vm_id, lock=True)
            if row is None or row.deleted:
                return 0
            # Only behind a snapshot this build loads: an older-version one (VERSION 1 pickles
            # of databases written before) is replaced by replaying the journal it covers.
            newest = next(
                (
                    snap.seq
                    for snap in repo.list_snapshots(s, vm_id, newest_first=True)
                    if self.engine.snapshot_readable(snap.data)
                ),
                0,
            )
            upto = min(newest, row.last_seq - self.journal_keep)
            if upto <= 0:
                return 0
            return repo.prune_journal(s, vm_id, upto_seq=upto)

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval_s)
            try:
                await self.gc()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if isinstance(e, ServiceUnavailable):
                    log.warning("gc skipped: database unavailable")
                else:
                    log.exception("gc failed")

    # ----------------------------------------------------------------- internals

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in a worker thread; if the caller is cancelled, still wait for it.

        A thread cannot be interrupted. Returning early would release the VM lock while
        the thread still works on the VM, and the next call would race it. The thread
        itself keeps the handle consistent with what it committed.
        """
        if self._pool is None:
            raise RuntimeError("VmService.start() has not been called")
        # The caller's context (its request id, for the log) goes along to the thread.
        ctx = contextvars.copy_context()
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(ctx.run, self._outage_guard, fn, *args)
        )
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():
                try:
                    await asyncio.wait({fut})
                except asyncio.CancelledError:
                    continue
            raise

    @staticmethod
    def _outage_guard(fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`; a database that does not answer becomes ServiceUnavailable (503, retry),
        whatever the call was doing (the handle is already consistent: see `_mutate_sync`)."""
        try:
            return fn(*args)
        except Exception as e:
            if not _is_outage(e):
                raise
            reason = _outage_reason(e)
            log.warning("database unavailable: %s", reason)
            raise ServiceUnavailable(reason) from e

    @asynccontextmanager
    async def _locked(self, vm_id: str) -> AsyncIterator[VmHandle]:
        """The VM's handle with its lock held (the VM's `slots_lock`)."""
        h = self._handles.get(vm_id)
        if h is None:
            h = self._handles[vm_id] = VmHandle(vm_id)
        h.users += 1
        h.last_used = time.monotonic()
        try:
            async with h.lock:
                try:
                    yield h
                except VmNotFound:
                    h.discard()  # deleted, maybe by another process: forget its state
                    raise
        finally:
            h.users -= 1
            if h.vm is None:
                self.ledger.forget(vm_id)  # discarded, deleted or never loaded
            # Do not keep handles for ids that never loaded (unknown ids, failed loads).
            if h.users == 0 and h.vm is None and self._handles.get(vm_id) is h:
                del self._handles[vm_id]
            self._evict_over_limit()

    def _head(self, s: Session, vm_id: str, *, lock: bool = False) -> repo.VmHead:
        """The live VM's version and tenant (Core: its JSON columns are never read)."""
        head = repo.vm_head(s, vm_id, lock=lock)
        if head is None or head.deleted:
            raise VmNotFound(vm_id)
        self._tenants[vm_id] = head.tenant
        return head

    def _live_row(self, s: Session, vm_id: str, *, lock: bool = False) -> VmRow:
        row = repo.get_vm(s, vm_id, lock=lock)
        if row is None or row.deleted:
            raise VmNotFound(vm_id)
        self._tenants[vm_id] = row.tenant
        return row

    # ----------------------------------------------------------------- tenants

    def set_tenant_quotas(self, quotas: TenantQuotas) -> None:
        self.quotas = quotas
        self.usage.quotas = quotas

    def tenant_of(self, vm_id: str | None) -> str | None:
        """The VM's tenant if this process has seen the VM (no database access)."""
        return None if vm_id is None else self._tenants.get(vm_id)

    async def vm_tenant(self, vm_id: str) -> str | None:
        """The VM's tenant (deleted VMs keep theirs); None when there is no such VM."""
        known = self._tenants.get(vm_id)
        if known is not None:
            return known

        def work() -> str | None:
            with self.db.read() as s:
                row = repo.get_vm_any(s, vm_id)
                return None if row is None else row.tenant

        found = await self._run(work)
        if found is not None:
            self._tenants[vm_id] = found
        return found

    def tenant_usage(self, tenant: str) -> TenantUsage:
        """The tenants' byte usage, `tenant`'s VMs learnt (their rows read once: blocking)."""
        self.usage.load(tenant, functools.partial(self._tenant_summaries, tenant))
        return self.usage

    def _tenant_summaries(self, tenant: str) -> list[tuple[str, dict[str, Any]]]:
        with self.db.read() as s:
            return [(r.id, r.summary) for r in repo.tenant_vms(s, tenant)]

    def _catch_up(self, s: Session, h: VmHandle, target_seq: int) -> Vm:
        """Bring `h.vm` to journal record `target_seq`: load it, or replay what it missed."""
        try:
            if h.vm is None or h.applied_seq > target_seq:
                # A reload holds memory too: reserved before it is built.
                h.vm = self._reserved_build(
                    h.vm_id, self._row_need(s, h.vm_id), lambda: self._build(s, h.vm_id, target_seq)
                )
                h.snapshot_seq = repo.newest_snapshot_seq(s, h.vm_id)
            elif h.applied_seq < target_seq:
                records = repo.replay_entries(s, h.vm_id, h.applied_seq, target_seq)
                if len(records) == target_seq - h.applied_seq:
                    h.vm = self._replay(s, h.vm_id, h.vm, records)
                else:  # pruned behind a newer snapshot meanwhile: load that one
                    h.vm = self._build(s, h.vm_id, target_seq)
                    h.snapshot_seq = repo.newest_snapshot_seq(s, h.vm_id)
        except BaseException:
            h.discard()
            raise
        h.applied_seq = target_seq
        return h.vm

    def _settle_held(self, key: str, vm: Vm, grant: budget.Grant | None = None) -> None:
        self.ledger.settle(
            key, grant or budget.Grant(), budget.bytes_held(vm), budget.tables_held(vm)
        )

    def _reserved_build(self, key: str, need: budget.Need, build: Callable[[], Vm]) -> Vm:
        """Build a VM's state (a reload, a fork) with what it will hold reserved first
        (ENOMEM before anything is decoded when it does not fit); then count what it holds."""
        self.ledger.forget(key)
        grant = self.ledger.reserve(key, need)
        try:
            vm = build()
        except BaseException:
            self.ledger.settle(key, grant, 0)
            self.ledger.forget(key)
            raise
        self._settle_held(key, vm, grant)
        return vm

    def _row_need(self, s: Session, vm_id: str) -> budget.Need:
        """What the VM held after its last journaled call, as its row counted it (rows from
        before the count: its page tables from the stats), plus the bytes of the snapshot
        it is rebuilt from, held while they are decoded."""
        row = repo.get_vm(s, vm_id)
        summary = (row.summary if row is not None else None) or {}
        newest = next(iter(repo.list_snapshots(s, vm_id, newest_first=True)), None)
        blob = 0 if newest is None else int(newest.size)
        held = summary.get(HELD_KEY)
        if isinstance(held, dict) and "bytes" in held:
            tables = int(held.get("tables", 0))
            other = max(0, int(held["bytes"]) - tables * TABLE_BYTES)
            return budget.Need(other + blob, tables)
        tables = (summary.get(STATS_KEY) or {}).get("page_tables", 0)
        return budget.Need(blob, tables if isinstance(tables, int) else 0)

    def _snapshot_need(self, s: Session, snap: SnapshotRow) -> budget.Need:
        """What a snapshot's state holds once decoded (nothing when its header is unreadable:
        it will not be decoded, the state is rebuilt and counted after)."""
        data = repo.snapshot_data(s, snap.id)
        try:
            counts = self.engine.snapshot_footprint(data) if data is not None else {}
        except Exception:
            counts = {}
        return budget.footprint_need(counts)

    def _build(self, s: Session, vm_id: str, target_seq: int) -> Vm:
        """The state after record `target_seq`: newest sound snapshot, else creation; + replay."""
        for snap in repo.list_snapshots(s, vm_id, upto_seq=target_seq, newest_first=True):
            # Only a base the kept journal continues from (retention prunes behind snapshots).
            if repo.count_journal(s, vm_id, snap.seq, target_seq) != target_seq - snap.seq:
                continue
            base = self._load_snapshot(s, snap)
            if base is not None:
                records = repo.replay_entries(s, vm_id, snap.seq, target_seq)
                return self._replay(s, vm_id, base, records)
        if repo.count_journal(s, vm_id, 0, target_seq) != target_seq:
            log.error(
                "VM %s: no sound snapshot before the pruned journal (seq %d)", vm_id, target_seq
            )
            raise ServiceUnavailable(f"VM {vm_id}: no sound snapshot the kept journal continues")
        base = self._create_base(s, vm_id)
        records = repo.replay_entries(s, vm_id, 0, target_seq)
        return self._replay(s, vm_id, base, records)

    def _create_base(self, s: Session, vm_id: str) -> Vm:
        row = repo.get_vm(s, vm_id)
        if row is None:
            raise VmNotFound(vm_id)
        ca = row.create_args
        if "from_snapshot" in ca:
            return self._state_of_snapshot(
                s, ca["source_vm"], ca["from_snapshot"], ca["source_seq"]
            )
        extra: dict[str, Any] = {"td_lifecycle": True} if ca.get("td_lifecycle") else {}
        extra["engine_rev"] = ca.get("engine_rev", 1)
        if ca.get("host"):
            extra["host"] = ca["host"]
        return self.engine.create(
            vm_type=ca["vm_type"],
            vcpus=ca["vcpus"],
            paging_levels=ca["paging_levels"],
            name=ca.get("name"),
            **extra,
        )

    def _state_of_snapshot(self, s: Session, vm_id: str, snap_id: str, seq: int) -> Vm:
        """A snapshot's state: its bytes if they are sound, else rebuilt from the journal
        (the snapshot may be corrupt, or pruned since a restore or fork named it)."""
        snap = repo.get_snapshot(s, snap_id)
        if snap is not None:
            vm = self._load_snapshot(s, snap)
            if vm is not None:
                return vm
        return self._build(s, vm_id, seq)

    def _load_snapshot(self, s: Session, snap: SnapshotRow) -> Vm | None:
        """Decode a snapshot; None (with a warning) when it is corrupt or gone."""
        data = repo.snapshot_data(s, snap.id)
        if data is None:
            return None
        problem: str
        if len(data) != snap.size or hashlib.sha256(data).hexdigest() != snap.checksum:
            problem = f"checksum mismatch ({len(data)} bytes, {snap.size} expected)"
        else:
            try:
                return self.engine.loads(data)
            except Exception as e:  # CorruptSnapshot, or anything a damaged blob provokes
                problem = f"{type(e).__name__}: {e}"
        log.warning(
            "snapshot %s of VM %s (seq %d) is corrupt: %s; rebuilding the VM from an older "
            "snapshot or its creation plus the journal",
            snap.id,
            snap.vm_id,
            snap.seq,
            problem,
        )
        return None

    def _replay(self, s: Session, vm_id: str, vm: Vm, records: Sequence[repo.JournalEntry]) -> Vm:
        """Re-apply journal records to `vm` (the engine is deterministic). Returns the VM,
        a new object after a `restore` record. Per record only what the call needs: its
        operation, time, budget and zap durations (no answer is journaled or published)."""
        engine = self.engine
        apply, set_budget = engine.apply_unanswered or engine.apply, engine.set_table_budget
        parse = _ParsedOps(engine.parse).parse
        engine.set_trace_records(vm, self.trace_records)
        default_budget = self.budget_tables
        for rec in records:
            if rec.op == RESTORE_OP:
                copy = repo.snapshot_at(s, vm_id, rec.seq)
                restored = None if copy is None else self._load_snapshot(s, copy)
                if restored is None:
                    args = repo.decode_json(rec.args)
                    restored = self._state_of_snapshot(s, vm_id, args["snapshot_id"], args["seq"])
                vm = restored
                engine.set_trace_records(vm, self.trace_records)
                continue
            meta = rec.meta or {}
            # The budget the call first ran with (it decides ENOMEM, and whether an MMIO SPTE
            # is cached): same state + same budget = same outcome. Records from before budgets
            # were journaled ran with the whole service's.
            budget = meta.get("table_budget")
            set_budget(vm, default_budget if budget is None else budget)
            at = us_to_engine_time(datetime_to_us(rec.at))
            try:
                apply(vm, parse(rec.op, rec.args), at, meta.get("durations"))
                outcome: int | None = None
            except KvmError as e:
                outcome = e.errno
            expected = None if rec.error is None else rec.error.get("errno")
            if outcome != expected:
                log.error(
                    "replay of VM %s record %d (%s) diverged: journaled errno %s, replay errno %s",
                    vm_id,
                    rec.seq,
                    rec.op,
                    expected,
                    outcome,
                )
        return vm

    @staticmethod
    def _count_work(h: VmHandle, vm: Vm, step: _Step) -> None:
        """Add what replaying this record will cost: the bytes it stores, and the page-table
        and SPTE bytes it built or tore down (the change of the VM's counts)."""
        work = step.journal_bytes
        before, after = h.work_stats, step.stats
        if before is not None:
            for name, weight in _WORK_STATS.items():
                old, new = before.get(name), after.get(name)
                if isinstance(old, int) and isinstance(new, int):
                    work += abs(new - old) * weight
        h.work_stats = after
        h.work_bytes += work

    def _snapshot_due(self, h: VmHandle) -> bool:
        if self.snapshot_every <= 0:  # automatic snapshots are off
            return False
        if h.applied_seq - h.snapshot_seq >= self.snapshot_every:
            return True
        return self.snapshot_work_bytes > 0 and h.work_bytes >= self.snapshot_work_bytes

    def _maybe_auto_snapshot(self, h: VmHandle) -> None:
        if (
            self._stopping
            or h.snapshot_task is not None
            or h.applied_seq <= h.snapshot_seq
            or not self._snapshot_due(h)
        ):
            return

        async def run() -> None:
            try:
                await self.create_snapshot(h.vm_id, kind="auto")
            except VmNotFound:
                pass
            except Exception as e:
                if isinstance(e, ServiceUnavailable):  # an outage, already logged: no trace
                    log.warning("automatic snapshot of VM %s skipped: %s", h.vm_id, e)
                else:
                    log.exception("automatic snapshot of VM %s failed", h.vm_id)
                # Try again after another `snapshot_every` records (or as much work), not on
                # every call.
                h.snapshot_seq = h.applied_seq
                h.work_bytes = 0
            finally:
                h.snapshot_task = None

        task = asyncio.get_running_loop().create_task(run())
        h.snapshot_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _summary(vm: Vm) -> dict[str, Any]:
        """What the VM row keeps of the state at `last_seq`: `vm.info()`, and `vm.stats()`
        (flat numbers) for /metrics."""
        return _json_copy(VmService._summary_raw(vm))

    @staticmethod
    def _summary_raw(vm: Vm) -> dict[str, Any]:
        """`_summary` before its private copy: only to be serialised or read at once."""
        held = {**held_split(vm), "bytes": budget.bytes_held(vm), "tables": budget.tables_held(vm)}
        return {**vm.info(), STATS_KEY: vm.stats(), HELD_KEY: held}

    @staticmethod
    def _info(row: VmRow) -> dict[str, Any]:
        info: dict[str, Any] = {
            "vm_type": row.vm_type,
            "vm_type_name": _vm_type_name(row.vm_type),
            "vcpus": row.vcpus,
            "paging_levels": row.paging_levels,
        }
        # The engine's view of live state wins for what it reports; identity is ours.
        info.update(
            {k: v for k, v in (row.summary or {}).items() if k not in (STATS_KEY, HELD_KEY)}
        )
        info.update(
            id=row.id,
            name=row.name,
            tenant=row.tenant,
            created_at=_iso(row.created_at),
            version=row.last_seq,
        )
        return info

    @staticmethod
    def _snapshot_info(snap: SnapshotRow) -> dict[str, Any]:
        return {
            "id": snap.id,
            "vm_id": snap.vm_id,
            "seq": snap.seq,
            "kind": snap.kind,
            "size": snap.size,
            "checksum": snap.checksum,
            "created_at": _iso(snap.created_at),
            "label": snap.label,
        }


class _ParsedOps:
    """Operations parsed from journal records, by (name, args text): records repeat (a VMM
    sets the same memslot over and over), and an operation that hashes is a frozen value of
    immutable fields, so one parse serves every record of the same text. At most `KEEP`
    are kept (then they are forgotten): a journal that never repeats holds no more."""

    KEEP = 4096

    def __init__(self, parse: Callable[[str, Any], OpLike]) -> None:
        self._parse = parse
        self._known: dict[tuple[str, str], OpLike] = {}

    def parse(self, name: str, args: Any) -> OpLike:
        if type(args) is not str:  # decoded by the driver (psycopg): nothing to key by
            return self._parse(name, repo.decode_json(args))
        key = (name, args)
        op = self._known.get(key)
        if op is None:
            op = self._parse(name, repo.decode_json(args))
            try:
                hash(op)
            except TypeError:  # a mutable field (a list): parsed afresh each time
                return op
            if len(self._known) >= self.KEEP:
                self._known.clear()
            self._known[key] = op
        return op


def _work_stats(vm: Vm) -> dict[str, Any]:
    """The counts `_count_work` weighs (`_WORK_STATS`), read straight from the engine's
    counters; an engine without them (a test double) answers its `stats()`."""
    mmu = getattr(vm, "mmu", None)
    pages = getattr(mmu, "pages", None)
    pool = getattr(mmu, "pool", None)
    if pages is None or pool is None:
        stats = vm.stats() if hasattr(vm, "stats") else {}
        return {k: stats.get(k) for k in _WORK_STATS}
    return {
        "page_tables": int(pool.live),
        "pages_4k": int(pages[1]),
        "pages_2m": int(pages[2]),
        "pages_1g": int(pages[3]),
    }


def _public_info(summary: dict[str, Any]) -> dict[str, Any]:
    """`vm.info()` out of a row summary (which adds the stats and the bytes held)."""
    return {k: v for k, v in summary.items() if k not in (STATS_KEY, HELD_KEY)}


def _meta(vm: Vm, budget: int) -> dict[str, Any]:
    """What replay must reuse rather than recompute: measured zap durations, the budget."""
    meta: dict[str, Any] = {"table_budget": budget}
    durations = getattr(vm, "last_durations", None)
    if durations:
        meta["durations"] = list(durations)
    return meta


def build_service(database_url: str, **options: Any) -> VmService:
    """A service on `database_url` with the real engine; `options` are `VmService`'s
    (`start()` upgrades the schema first unless `run_migrations=False`)."""
    return VmService(database_url, engine=default_engine(), **options)


def service_options(settings: Any) -> dict[str, Any]:
    """`VmService` options from `app.config.Settings` (what `vkmmu serve` runs with)."""
    return {
        "snapshot_every": settings.snapshot_every,
        "snapshot_work_bytes": settings.snapshot_work_bytes,
        "page_table_budget_bytes": settings.page_table_budget_bytes,
        "max_loaded_vms": settings.max_loaded_vms,
        "journal_keep": settings.journal_keep,
        "retention_s": settings.retention_s,
        "max_manual_snapshots": settings.max_manual_snapshots,
        "gc_interval_s": settings.gc_interval_s,
        "memory_budget_bytes": settings.memory_budget_bytes,
        "vm_memory_budget_bytes": settings.vm_memory_budget_bytes,
        "max_gmem_bytes": settings.max_guest_memfd_bytes,
        "trace_records": settings.trace_records,
        "sqlite_synchronous": settings.sqlite_synchronous,
        "tenant_quotas": tenant_quotas(settings),
        "host_profile": {
            "enable_pml": settings.host_enable_pml,
            "eager_page_split": settings.host_eager_page_split,
            "nx_huge_pages": settings.host_nx_huge_pages,
            "tdp_mmu": settings.host_tdp_mmu,
        },
    }


def tenant_quotas(settings: Any) -> TenantQuotas:
    return TenantQuotas(
        max_vms=settings.tenant_max_vms,
        max_snapshots=settings.tenant_max_snapshots,
        page_table_bytes=settings.tenant_page_table_bytes,
        content_bytes=settings.tenant_content_bytes,
    )
