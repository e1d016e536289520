"""The in-process event bus: typed events of every VM, fanned out to stream subscribers.

Events are published on the event loop after a call has committed (never for a call that
changed nothing), so a subscriber only ever sees what the journal holds. Each event gets an
integer `id`, increasing across the process and across restarts (it starts at the boot time
in microseconds), so a client's `Last-Event-ID` from an older process is simply "older than
anything here".

Memory stays bounded: the last `RING_SIZE` events are kept for resumption, and each
subscriber owns a queue of at most `queue_max` events. A subscriber that falls that far
behind is dropped: its queue is emptied and it receives one final `dropped` event naming the
last id it was given, from which it may resume while the ring still holds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Every type an event can have (the `event:` field of the stream).
EVENT_TYPES = (
    "vm_created",
    "vm_deleted",
    "memslot",
    "zap",
    "fault",
    "exit",
    "conversion",
    "snapshot",
)
# Control events a stream may end with or carry; they are never stored in the ring.
CONTROL_TYPES = ("gap", "dropped", "end")

RING_SIZE = 4096
QUEUE_MAX = 1024
HEARTBEAT_S = 15.0


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str
    vm: str | None
    at: float  # wall clock, seconds
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The stream's form: times in RFC 3339, as every REST answer gives them."""
        data = self.data
        if self.type == "zap" and isinstance(data.get("at"), int | float):
            data = {**data, "at": rfc3339(data["at"])}
        return {
            "id": self.id,
            "type": self.type,
            "vm": self.vm,
            "at": rfc3339(self.at),
            "data": data,
        }


def rfc3339(ts: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC, the form pydantic gives a datetime."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Control:
    """A stream-only event: `gap` (events before it were lost), `dropped`, `end`."""

    type: str
    data: dict[str, Any]


@dataclass(eq=False)
class Subscription:
    vm: str | None
    types: frozenset[str] | None
    queue_max: int
    queue: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_id: int = 0
    # The newest event when it subscribed: older ones come from the ring (shared memory),
    # newer ones through its own bounded queue.
    mark: int = 0
    dropped: bool = False
    closed: str | None = None  # why the bus ended this subscription
    # Which VMs' events it may see (a tenant's stream: its own VMs only); None: all.
    visible: Callable[[str | None], bool] | None = None

    def wants(self, ev: Event) -> bool:
        if self.vm is not None and ev.vm != self.vm:
            return False
        if self.visible is not None and not self.visible(ev.vm):
            return False
        return self.types is None or ev.type in self.types


# Called with each published run of events, in order (metrics): a batch of calls is one run.
Listener = Callable[[list[Event]], None]


class EventBus:
    def __init__(self, *, ring_size: int = RING_SIZE, queue_max: int = QUEUE_MAX) -> None:
        self.ring: deque[Event] = deque(maxlen=ring_size)
        self.queue_max = queue_max
        self._next_id = time.time_ns() // 1000
        # Ids at or below these were never here (an older process) or left the ring.
        self.boot_id = self._next_id + 1
        self.evicted_upto = 0
        self._subs: set[Subscription] = set()
        self._listeners: list[Listener] = []
        self.closed = False
        self.dropped_total = 0

    # ------------------------------------------------------------ publishing

    def add_listener(self, fn: Listener) -> None:
        """Called synchronously with every published run of events (metrics)."""
        self._listeners.append(fn)

    def publish(self, type_: str, vm: str | None, data: dict[str, Any]) -> Event:
        return self.publish_many(vm, [(type_, data)])[0]

    def publish_many(self, vm: str | None, items: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Publish `items` (type, data) of one VM in order, as consecutive ids: what as many
        `publish` calls would, with one clock read and one pass over the subscribers."""
        if not items:
            return []
        first = max(self._next_id + 1, time.time_ns() // 1000)
        at = time.time()
        evs = [Event(first + i, type_, vm, at, data) for i, (type_, data) in enumerate(items)]
        self._next_id = first + len(evs) - 1
        ring = self.ring
        assert ring.maxlen is not None
        overflow = len(ring) + len(evs) - ring.maxlen
        if overflow > 0:  # the newest of those about to leave the ring
            gone = ring[overflow - 1] if overflow <= len(ring) else evs[overflow - len(ring) - 1]
            self.evicted_upto = gone.id
        ring.extend(evs)
        for fn in self._listeners:
            fn(evs)
        for sub in list(self._subs):
            if sub.dropped:
                continue
            wanted = [ev for ev in evs if sub.wants(ev)]
            if not wanted:
                continue
            if len(sub.queue) + len(wanted) > sub.queue_max:
                # The client cannot keep up: free its buffer now, tell it once, end it.
                sub.queue.clear()
                sub.dropped = True
                self.dropped_total += 1
            else:
                sub.queue.extend(wanted)
            sub.wake.set()
        return evs

    def publish_calls(
        self,
        vm_id: str,
        calls: Iterable[tuple[str, dict[str, Any], Any, bool]],
        info: dict[str, Any] | None,
    ) -> None:
        """The typed events of committed engine calls, in order: (op, args, JSON answer,
        zapped) each; `zapped` False: the engine recorded no zap event, so the answer holds
        none. `info`: the VM's `info()` after the last call."""
        items: list[tuple[str, dict[str, Any]]] = []
        for op, args, result, zapped in calls:
            items += events_of_call(op, args, result, info, zapped=zapped)
        self.publish_many(vm_id, items)

    # ------------------------------------------------------------ subscribing

    def subscribe(
        self,
        *,
        vm: str | None = None,
        types: Iterable[str] | None = None,
        visible: Callable[[str | None], bool] | None = None,
    ) -> Subscription:
        sub = Subscription(vm, None if types is None else frozenset(types), self.queue_max)
        sub.visible = visible
        sub.mark = self.ring[-1].id if self.ring else 0
        if self.closed:
            sub.closed = "shutdown"
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def backlog(self, sub: Subscription, after: int) -> tuple[list[Event], bool]:
        """Events the subscriber wants with id > `after` still in the ring, and whether some
        were already lost (`after` is older than the ring's oldest event)."""
        lost = after != 0 and (after < self.evicted_upto or after < self.boot_id - 1)
        return [e for e in self.ring if after < e.id <= sub.mark and sub.wants(e)], lost

    def close(self) -> None:
        """Shutdown: every stream ends with `end {"reason": "shutdown"}`."""
        self.closed = True
        for sub in list(self._subs):
            sub.closed = "shutdown"
            sub.wake.set()

    def end_vm(self, vm_id: str) -> None:
        for sub in list(self._subs):
            if sub.vm == vm_id:
                sub.closed = "vm_deleted"
                sub.wake.set()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def stream(
        self,
        sub: Subscription,
        *,
        after: int = 0,
        heartbeat_s: float = HEARTBEAT_S,
        deadline: float | None = None,
    ) -> AsyncIterator[Event | Control | None]:
        """Yield the backlog after `after`, then live events; None is a heartbeat. Ends with
        a Control (`dropped`, `end`) or when `deadline` (monotonic) passes."""
        try:
            old, lost = self.backlog(sub, after)
            if lost:
                oldest = self.ring[0].id if self.ring else None
                yield Control("gap", {"after": after, "oldest": oldest})
            # Live events already queued may repeat the backlog's tail: skip by id.
            for ev in old:
                sub.last_id = ev.id
                yield ev
            if sub.last_id == 0:
                sub.last_id = after
            while True:
                while sub.queue and not sub.dropped:
                    ev = sub.queue.popleft()
                    if ev.id > sub.last_id:
                        sub.last_id = ev.id
                        yield ev
                if sub.dropped:
                    yield Control("dropped", {"reason": "slow_client", "last_id": sub.last_id})
                    return
                if sub.closed is not None:
                    yield Control("end", {"reason": sub.closed})
                    return
                sub.wake.clear()
                wait = heartbeat_s
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                try:
                    await asyncio.wait_for(sub.wake.wait(), wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    yield None
        finally:
            self.unsubscribe(sub)


def zap_events_in(result: Any) -> list[dict[str, Any]]:
    """Every zap event inside an engine answer (one fixed shape: see docs/engine.md)."""
    out: list[dict[str, Any]] = []
    # Iterative, and only containers are visited: a batch of 1024 memslot answers walks
    # every one of them, most of whose values are numbers.
    stack: list[Any] = [result] if isinstance(result, dict | list) else []
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if "sptes_zapped" in v and "path" in v and "cause" in v:
                out.append(v)
                continue
            children = [x for x in v.values() if isinstance(x, dict | list)]
        else:
            children = [x for x in v if isinstance(x, dict | list)]
        stack.extend(reversed(children))  # popped in document order
    return out


_FAULT_OPS = ("access", "load", "store", "pre_fault", "accept")


def events_of_call(
    op: str,
    args: dict[str, Any],
    result: Any,
    info: dict[str, Any] | None,
    *,
    zapped: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of each event one engine call produced; `info` is the VM's `info()`
    after the call (VM type, quirk state), when the VM is still loaded. `zapped` False: the
    call recorded no zap event, and its answer is not searched for one."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(result, dict):
        result = {}
    vm_type = (info or {}).get("vm_type_name")
    if op == "set_user_memory_region" and result.get("change"):
        out.append(
            (
                "memslot",
                {
                    "change": result["change"],
                    "slot": args.get("slot"),
                    "memslot": result.get("memslot"),
                },
            )
        )
    if op in _FAULT_OPS and result.get("pages"):
        out.append(
            (
                "fault",
                {
                    "op": op,
                    "vcpu": args.get("vcpu"),
                    "gpa": args.get("gpa"),
                    "size": args.get("size"),
                    "access": args.get("access"),
                    "pages": result.get("pages", 0),
                    "mapped": result.get("mapped", 0),
                    "refaults": result.get("refaults", 0),
                    "spurious": result.get("spurious", 0),
                    "levels": result.get("levels", {}),
                    "vm_type": vm_type,
                    # Whether KVM_X86_QUIRK_SLOT_ZAP_ALL is in force (enabled, default VM).
                    "slot_zap_all": (info or {}).get("slot_zap_all_applies"),
                },
            )
        )
    if op == "set_memory_attributes":
        out.append(
            (
                "conversion",
                {
                    "address": args.get("address"),
                    "size": args.get("size"),
                    "attributes": args.get("attributes"),
                },
            )
        )
    for z in zap_events_in(result) if zapped else ():
        out.append(("zap", z))
    exit_ = result.get("exit")
    if isinstance(exit_, dict):
        out.append(("exit", {"op": op, "vcpu": args.get("vcpu"), **exit_}))
    return out
