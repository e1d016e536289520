"""Trace replay: a VMM's memslot calls applied in order, with optional guest behaviour.

`ReplayPlan` turns a parsed trace (and a touch mode) into engine calls handed out one at a
time; the outcome of each decides what the guest touches next. The same plan runs against
a stored VM (`replay`, through `VmService.mutate_many`: journaled, locked, persisted) or
against an in-memory fork (`run_local`, used by what-if).

Guest behaviour ("touch"), in guest reads by vCPU 0 of address space 0:
- `none`: the guest never touches memory;
- `all_ram`: the guest's RAM is every address-space-0 memslot the trace creates and never
  deletes or moves again (what stays: RAM, not VGA windows, BARs or unplugged DIMMs); each
  is touched when created and again whenever a zap took some of it away;
- `after_each`: every address-space-0 memslot present is kept touched after every line;
- a list of GPA ranges: those ranges, where a memslot backs them, kept touched likewise.

A page still mapped takes no EPT violation, so touching it again would cost nothing: a
slot is touched when it appears and when a zap covered it (a fast zap covers every slot),
which is the same outcome as touching everything after every line, at a fraction of the
work.
"""

from __future__ import annotations

import errno as errno_mod
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.engine import ops
from app.engine.errors import KvmError
from app.services.qemu_trace import KVM_MEM_GUEST_MEMFD, Trace, TraceCall, TraceError

TOUCH_MODES = ("none", "all_ram", "after_each")
# Calls applied per transaction when replaying onto a stored VM (and per progress report).
REPLAY_BATCH = 500
PAGE = 4096

# Operations a what-if or replay may not run: they end the VM or are the service's own.
_FORBIDDEN_OPS = frozenset({"destroy", "restore"})
# Fields whose string values are byte payloads, never integers.
_BYTE_FIELDS = frozenset({"data", "bitmap"})
_HEX_INT = re.compile(r"^0[xX][0-9a-fA-F]{1,16}$")


class OpError(ValueError):
    """An operation object that is not one (unknown name, missing fields): a 422."""


def engine_call(op: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`{"op": NAME, …fields}` to the engine call `(name, args)` the journal stores.

    The one place that knows the operation wire form: `NAME` is an engine operation with
    its journal fields, plus the shorthand `{"op": "delete_memslot", "slot": N}`; an
    `access` without `vcpu` is vCPU 0's."""
    if not isinstance(op, Mapping):
        raise OpError("an operation is an object")
    name = op.get("op")
    if not isinstance(name, str):
        raise OpError('an operation needs "op": the operation name')
    args = {
        k: int(v, 16) if isinstance(v, str) and k not in _BYTE_FIELDS and _HEX_INT.match(v) else v
        for k, v in op.items()
        if k != "op"
    }
    if name == "delete_memslot":
        if set(args) != {"slot"}:
            raise OpError('"delete_memslot" takes exactly one field, "slot"')
        return "set_user_memory_region", {
            "slot": args["slot"],
            "flags": 0,
            "guest_phys_addr": 0,
            "memory_size": 0,
            "userspace_addr": 0,
            "guest_memfd": 0,
            "guest_memfd_offset": 0,
        }
    if name in _FORBIDDEN_OPS or name not in ops.NAMES:
        known = sorted((set(ops.NAMES) - _FORBIDDEN_OPS) | {"delete_memslot"})
        raise OpError(f"unknown operation {name[:64]!r}; known: {', '.join(known)}")
    if name == "access":
        args.setdefault("vcpu", 0)
    return name, args


@dataclass(frozen=True)
class Touch:
    mode: str = "none"  # one of TOUCH_MODES, or "ranges"
    ranges: tuple[tuple[int, int], ...] = ()  # [gpa, gpa + size) when mode == "ranges"

    @classmethod
    def parse(cls, value: Any) -> Touch:
        """`"none" | "all_ram" | "after_each"`, or a list of `{"gpa", "size"}` / `[gpa, size]`
        ranges (integers or "0x…" strings)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            if value not in TOUCH_MODES:
                raise OpError(f"touch must be one of {', '.join(TOUCH_MODES)} or a range list")
            return cls(value)
        if not isinstance(value, list) or len(value) > 1024:
            raise OpError("touch ranges: a list of at most 1024 {gpa, size} objects")
        ranges = []
        for r in value:
            gpa, size = (r.get("gpa"), r.get("size")) if isinstance(r, Mapping) else (r, None)
            if isinstance(r, list | tuple) and len(r) == 2:
                gpa, size = r
            gpa, size = _as_int(gpa), _as_int(size)
            if gpa is None or size is None or size <= 0 or gpa + size > 1 << 64:
                raise OpError("a touch range is {gpa, size} with size > 0 inside 64 bits")
            ranges.append((gpa, gpa + size))
        return cls("ranges", tuple(ranges))

    def describe(self) -> str | list[dict[str, int]]:
        if self.mode != "ranges":
            return self.mode
        return [{"gpa": a, "size": b - a} for a, b in self.ranges]


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, str) and (_HEX_INT.match(v) or v.isdigit()):
        return int(v, 0) if v[:2].lower() == "0x" else int(v)
    return None


def errno_name(n: int | None) -> str | None:
    return None if n is None else errno_mod.errorcode.get(n, str(n))


@dataclass
class TouchCounts:
    accesses: int = 0
    pages_mapped: int = 0
    refaults: int = 0
    errors: int = 0
    first_error: str | None = None


@dataclass
class ReplayPlan:
    """The calls of a trace replay (a `CallFeed`), and the rows its outcomes make."""

    calls: list[TraceCall]
    touch: Touch = field(default_factory=Touch)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[TraceError] = field(default_factory=list)
    touches: TouchCounts = field(default_factory=TouchCounts)
    # slot -> (gpa, end) of the address-space-0 memslots present, as the outcomes left them
    present: dict[int, tuple[int, int]] = field(default_factory=dict)
    _next: int = 0
    _queue: deque[tuple[TraceCall | None, tuple[str, dict[str, Any]]]] = field(
        default_factory=deque
    )
    _pending: TraceCall | None = None
    _pending_is_touch: bool = False
    _stable: dict[int, int] = field(default_factory=dict)  # slot -> index of its last line
    _stable_live: set[int] = field(default_factory=set)  # stable slots in their final form

    def __post_init__(self) -> None:
        if self.touch.mode == "all_ram":
            last: dict[int, int] = {}
            for i, c in enumerate(self.calls):
                last[c.slot] = i
            self._stable = {
                s: i
                for s, i in last.items()
                if s >> 16 == 0 and self.calls[i].size > 0 and self.calls[i].ret == 0
            }

    @property
    def done(self) -> int:
        """Trace lines handed out so far."""
        return self._next

    def next_call(self) -> tuple[str, dict[str, Any]] | None:
        while not self._queue:
            if self._next >= len(self.calls):
                return None
            call = self.calls[self._next]
            self._next += 1
            if call.flags & KVM_MEM_GUEST_MEMFD:
                self.skipped.append(
                    TraceError(
                        call.line,
                        "guest_memfd memslots are not replayed: the trace's guest_memfd is a "
                        "descriptor of the traced process, not one of this VM's",
                    )
                )
                continue
            self._queue.append((call, engine_call(call.to_op())))
        item, c = self._queue.popleft()
        self._pending, self._pending_is_touch = item, item is None
        return c

    def record(self, outcome: Any) -> None:
        if self._pending_is_touch:
            self._record_touch(outcome)
            return
        call = self._pending
        assert call is not None
        ok = not isinstance(outcome, KvmError)
        got = None if ok else outcome.errno
        row: dict[str, Any] = {
            "line": call.line,
            "slot": call.slot,
            "ok": ok,
            "change": outcome.get("change") if ok else None,
            "errno": got,
            "errno_name": errno_name(got),
            "ret": call.ret,
            "matches_trace": got == call.expected_errno,
            "zap": outcome.get("zap") if ok else None,
            "detail": None if ok else outcome.detail,
        }
        self.rows.append(row)
        if not ok:
            # A move that failed after its zap still zapped (state_changed): the zap counts.
            return
        new: tuple[int, int] | None = None
        last = self._stable.get(call.slot)
        if last is not None and self.calls[last] is call:
            self._stable_live.add(call.slot)
        if call.as_id == 0:
            slot_info = outcome.get("memslot")
            if slot_info is None:
                self.present.pop(call.slot, None)
            else:
                gpa = int(slot_info["guest_phys_addr"])
                new = (gpa, gpa + int(slot_info["memory_size"]))
                self.present[call.slot] = new
        self._plan_touches(call, row["change"], new, row["zap"])

    # ------------------------------------------------------------------ guest touches

    def _wanted(self, slot: int, span: tuple[int, int]) -> list[tuple[int, int]]:
        mode = self.touch.mode
        if mode == "none":
            return []
        if mode == "all_ram":
            return [span] if slot in self._stable_live else []
        if mode == "after_each":
            return [span]
        out = []
        for a, b in self.touch.ranges:
            lo, hi = max(a, span[0]), min(b, span[1])
            if lo < hi:
                out.append((lo, hi))
        return out

    def _plan_touches(
        self,
        call: TraceCall,
        change: str | None,
        new: tuple[int, int] | None,
        zap: dict[str, Any] | None,
    ) -> None:
        if self.touch.mode == "none":
            return
        spans: list[tuple[int, int]] = []
        lost: tuple[int, int] | None = None
        if zap is not None and (zap.get("path") == "zap_all_fast" or zap["sptes_zapped_total"]):
            if zap.get("path") == "zap_all_fast":
                lost = (0, 1 << 64)
            elif zap.get("as_id") in (0, None):
                lost = (int(zap["gfn_start"]) * PAGE, int(zap["gfn_end"]) * PAGE)
        for slot, span in sorted(self.present.items()):
            fresh = slot == call.slot and change in ("create", "move") and new is not None
            hit = lost is not None and span[0] < lost[1] and lost[0] < span[1]
            if fresh or hit:
                spans.extend(self._wanted(slot, span))
        for a, b in spans:
            op = {"op": "access", "vcpu": 0, "gpa": a, "size": b - a, "access": "read"}
            self._queue.append((None, engine_call(op)))

    def _record_touch(self, outcome: Any) -> None:
        t = self.touches
        t.accesses += 1
        if isinstance(outcome, KvmError):
            t.errors += 1
            if t.first_error is None:
                t.first_error = f"{errno_name(outcome.errno)}: {outcome.detail}"
            return
        t.pages_mapped += int(outcome.get("mapped", 0))
        t.refaults += int(outcome.get("refaults", 0))

    # ------------------------------------------------------------------ the answer

    def answer(self, trace: Trace) -> dict[str, Any]:
        errors = sorted([*trace.errors, *self.skipped], key=lambda e: (e.line, e.message))
        mismatches = [r["line"] for r in self.rows if not r["matches_trace"]]
        return {
            "results": self.rows,
            "ignored": trace.ignored,
            "errors": [{"line": e.line, "message": e.message} for e in errors],
            "lines": trace.lines,
            "applied": len(self.rows),
            "mismatches": len(mismatches),
            "mismatched_lines": mismatches[:100],
            "touch": {
                "mode": self.touch.describe(),
                "accesses": self.touches.accesses,
                "pages_mapped": self.touches.pages_mapped,
                "refaults": self.touches.refaults,
                "errors": self.touches.errors,
                "first_error": self.touches.first_error,
            },
        }


Progress = Callable[[int, int], Awaitable[None]]


async def replay(
    service: Any,
    vm_id: str,
    trace: Trace,
    touch: Touch,
    *,
    progress: Progress | None = None,
    batch: int = REPLAY_BATCH,
    if_match: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Replay `trace` onto the stored VM `vm_id` (journaled, a batch per transaction).
    `if_match`: the VM's version the replay must start from (412 otherwise). Answers (the
    replay answer, the VM's ETag after it)."""
    plan = ReplayPlan(trace.calls, touch)
    tag = ""
    total = len(trace.calls)
    while True:
        n, tag = await service.mutate_many(vm_id, plan, max_calls=batch, if_match=if_match)
        if_match = None  # the version is checked before the first batch only
        if progress is not None:
            await progress(plan.done, total)
        if n < batch:  # the feed ran out within this batch
            break
    return plan.answer(trace), tag


def run_local(vm: Any, plan: Any, *, at: float) -> None:
    """Run a feed's calls against an in-memory VM (a what-if fork): no journal, no lock."""
    while (call := plan.next_call()) is not None:
        try:
            plan.record(vm.apply(ops.parse(call[0], call[1]), at=at))
        except KvmError as e:
            plan.record(e)
