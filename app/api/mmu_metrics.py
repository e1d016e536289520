"""The service's Prometheus metrics, on an app-scoped registry (see docs/metrics.md).

Two kinds of figures, and the HELP text of each says which it is:
- **the kernel's stats** (`vkmmu_vm_<kvm stat name>{vm}`): the names KVM's binary stats
  interface gives (`remote_tlb_flush`, `pages_4k`, `pf_fixed`, …), one series per VM while
  it exists, for the newest `max_vms` VMs. They come from each VM's row, written with every
  journaled call, so they survive a restart and a scrape never loads a VM.
- **vkmmu's own** (`vkmmu_zap_*`, `vkmmu_refaults_total`, `vkmmu_sptes`, …): aggregated
  over VMs with bounded labels only (path, cause, VM type, quirk state, root role, level).
  The counters among them are counted by this process from the event bus as calls commit:
  they start at zero when the process starts (Prometheus' `rate()`/`increase()` treat that
  as a counter reset).
"""

from __future__ import annotations

import collections
import platform
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.engine.stats import KVM_STAT_NAMES, VCPU_STAT_NAMES, is_cumulative
from app.services.events import EVENT_TYPES, Event, EventBus

# `…_created` series double every counter and histogram for a timestamp Prometheus does not
# use (the text format has no place for it: promtool flags each as a family without help).
disable_created_metrics()

ZAP_LABELS = ("path", "cause", "vm_type", "slot_zap_all")
LEVELS = ("4k", "2m", "1g")
# The event types that feed more than the events counter.
_DETAILED = frozenset({"zap", "fault", "exit", "vm_deleted"})
ROOTS = ("direct", "mirror")
# Zap durations run from microseconds (an empty range) to seconds (a huge fast zap).
DURATION_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The kernel's stat names reported per VM (VM stats, then vCPU stats summed over vCPUs).
PER_VM_STATS = KVM_STAT_NAMES + VCPU_STAT_NAMES
TABLE_BYTES = 4096
# Bounded label values: anything else a future engine reports is folded into "other".
KNOWN_PATHS = frozenset(
    {
        "zap_all_fast",
        "zap_slot_leafs",
        "zap_gfn_range",
        "zap_all",
        "dirty_log",
        "none",
    }
)
_ON_OFF = {True: "on", False: "off"}


def _onoff(v: Any) -> str:
    return _ON_OFF.get(bool(v), "off") if v is not None else "unknown"


def _bounded(value: Any, known: frozenset[str] | None = None, limit: int = 48) -> str:
    s = str(value) if value is not None else "none"
    if known is not None and s not in known:
        return "other"
    # Causes and VM types are short names; anything longer is not a name.
    return s if len(s) <= limit and s.replace("_", "").isalnum() else "other"


def version() -> str:
    try:
        return metadata.version("vkmmu")
    except metadata.PackageNotFoundError:
        return "unknown"


class MmuMetrics:
    """Counters fed by the event bus, HTTP metrics fed by the middleware, and the gauges
    computed at scrape time from the VM rows (`set_scrape`)."""

    def __init__(self, *, max_vms: int = 100, budget_bytes: int = 0) -> None:
        self.max_vms = max(0, max_vms)
        self.budget_bytes = budget_bytes
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        own = "(vkmmu's own count, since this process started)"
        self.zap_events = Counter(
            "vkmmu_zap_events", f"Zaps by path, cause, VM type and SLOT_ZAP_ALL {own}",
            ZAP_LABELS, registry=r,
        )  # fmt: skip
        self.zap_duration = Histogram(
            "vkmmu_zap_duration_seconds",
            f"Time one zap took, measured by the engine {own}",
            ZAP_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.zap_sptes = Counter(
            "vkmmu_zap_sptes",
            f"Leaf SPTEs zapped, by root role (direct/mirror) and level {own}",
            (*ZAP_LABELS, "root", "level"),
            registry=r,
        )
        self.tlb_flushes = Counter(
            "vkmmu_tlb_flushes", f"Remote TLB flushes the zaps requested {own}", ZAP_LABELS,
            registry=r,
        )  # fmt: skip
        self.vcpu_kicks = Counter(
            "vkmmu_vcpu_kicks", f"vCPUs kicked out of the guest by zaps {own}", ZAP_LABELS,
            registry=r,
        )  # fmt: skip
        self.refaults = Counter(
            "vkmmu_refaults",
            "4 KiB pages faulted in again after a zap took them, labelled with the path and "
            f"cause of that VM's latest zap {own}",
            ZAP_LABELS,
            registry=r,
        )
        self.fault_pages = Counter(
            "vkmmu_fault_pages",
            f"Pages mapped by guest faults, by VM type and level {own}",
            ("vm_type", "level"),
            registry=r,
        )
        self.exits = Counter(
            "vkmmu_guest_exits",
            f"Guest exits to the VMM (KVM_EXIT_*) {own}",
            ("reason",),
            registry=r,
        )
        self.events = Counter(
            "vkmmu_events", f"Events published on the live stream, by type {own}", ("type",),
            registry=r,
        )  # fmt: skip
        self._event_counters: dict[str, Any] = {}
        self._zap_series: dict[tuple[str, str, str, str], _ZapSeries] = {}
        self._http_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.http_requests = Counter(
            "vkmmu_http_requests",
            f"HTTP requests by method, route template and status {own}",
            ("method", "route", "status"),
            registry=r,
        )
        self.http_duration = Histogram(
            "vkmmu_http_request_duration_seconds",
            f"HTTP request latency to the end of the answer, by route template {own}",
            ("method", "route"),
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        info = Gauge(
            "vkmmu_build_info", "vkmmu's version and runtime (always 1)",
            ("version", "python"), registry=r,
        )  # fmt: skip
        info.labels(version(), platform.python_version()).set(1)
        self.started = Gauge(
            "vkmmu_process_start_time_seconds",
            "When this process started (its own counters count from here)",
            registry=r,
        )
        self.started.set(time.time())
        self._scrape = _ScrapeState()
        r.register(self._scrape)
        # Path and cause of each VM's latest zap seen here (labels its refaults).
        self._last_zap: dict[str, tuple[str, str]] = {}
        self._bus: EventBus | None = None

    # ------------------------------------------------------------ feeding

    def attach(self, bus: EventBus, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None:
            self.budget_bytes = budget_bytes
        if self._bus is bus:
            return
        self._bus = bus
        bus.add_listener(self.on_events)
        self._scrape.bus = bus

    def on_events(self, evs: list[Event]) -> None:
        # A batch of calls publishes one run: each counter moves once (an `inc` takes a lock).
        kinds = collections.Counter(ev.type if ev.type in EVENT_TYPES else "other" for ev in evs)
        for kind, n in kinds.items():
            counter = self._event_counters.get(kind)
            if counter is None:  # `labels()` costs a lock and a lookup: once per type
                counter = self._event_counters[kind] = self.events.labels(kind)
            counter.inc(n)
        for ev in evs:
            if ev.type in _DETAILED:
                self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        d = ev.data
        if ev.type == "zap":
            self._zap(ev.vm, d)
        elif ev.type == "fault":
            vm_type = _bounded(d.get("vm_type"))
            for level in LEVELS:
                n = (d.get("levels") or {}).get(level, 0)
                if n:
                    self.fault_pages.labels(vm_type, level).inc(n)
            if d.get("refaults"):
                path, cause = self._last_zap.get(ev.vm or "", ("none", "none"))
                self.refaults.labels(path, cause, vm_type, _onoff(d.get("slot_zap_all"))).inc(
                    d["refaults"]
                )
        elif ev.type == "exit":
            self.exits.labels(_bounded(d.get("reason"))).inc()
        elif ev.type == "vm_deleted":
            self._last_zap.pop(ev.vm or "", None)

    def _zap(self, vm: str | None, z: dict[str, Any]) -> None:
        labels = (
            _bounded(z.get("path"), KNOWN_PATHS),
            _bounded(z.get("cause")),
            _bounded(z.get("vm_type")),
            _onoff(z.get("slot_zap_all")),
        )
        if vm is not None and labels[1] != "vm_destroy":
            self._last_zap[vm] = (labels[0], labels[1])
        series = self._zap_series.get(labels)
        if series is None:  # `labels()` costs a lock and a lookup: once per label set
            series = self._zap_series[labels] = _ZapSeries(
                self.zap_events.labels(*labels),
                self.zap_duration.labels(*labels),
                tuple(
                    tuple(self.zap_sptes.labels(*labels, root, level) for level in LEVELS)
                    for root in ROOTS
                ),
                self.tlb_flushes.labels(*labels),
                self.vcpu_kicks.labels(*labels),
            )
        series.events.inc()
        series.duration.observe(max(0, z.get("duration_us", 0)) / 1e6)
        by_root = z.get("sptes_zapped") or {}
        for root, counters in zip(ROOTS, series.sptes, strict=True):
            per_level = by_root.get(root) or {}
            for level, counter in zip(LEVELS, counters, strict=True):
                # Every series exists once the labels do: a rate() over 0 is 0, not absent.
                counter.inc(per_level.get(level, 0))
        series.tlb_flushes.inc(z.get("tlb_flushes", 0))
        series.vcpu_kicks.inc(z.get("vcpu_kicks", 0))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        series = self._http_series.get(key)
        if series is None:  # as many as the label sets `labels()` keeps anyway
            series = self._http_series[key] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_duration.labels(method, route),
            )
        series[0].inc()
        series[1].observe(seconds)

    def set_scrape(
        self,
        summaries: dict[str, dict[str, Any]],
        stats: dict[str, dict[str, Any]],
        loaded: int,
        table_bytes: int,
    ) -> None:
        """What the next `generate_latest` reports of present state (called right before it,
        with no await in between: concurrent scrapes cannot mix their snapshots)."""
        s = self._scrape
        s.summaries, s.stats, s.loaded, s.table_bytes = summaries, stats, loaded, table_bytes
        s.max_vms, s.budget_bytes = self.max_vms, self.budget_bytes


class _ZapSeries(NamedTuple):
    """The zap series of one label set (path, cause, VM type, slot_zap_all)."""

    events: Any
    duration: Any
    sptes: tuple[tuple[Any, ...], ...]  # by root, then by level
    tlb_flushes: Any
    vcpu_kicks: Any


class _ScrapeState:
    """Gauges of present state and the per-VM kernel stats, from the last `set_scrape`."""

    def __init__(self) -> None:
        self.summaries: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.loaded = 0
        self.table_bytes = 0
        self.max_vms = 0
        self.budget_bytes = 0
        self.bus: EventBus | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary per scrape: never checked for name clashes up front

    def collect(self) -> Iterator[Metric]:
        own = "(vkmmu's own figure)"
        vms = GaugeMetricFamily("vkmmu_vms", f"Live VMs, stored in the database {own}")
        vms.add_metric([], len(self.summaries))
        yield vms
        loaded = GaugeMetricFamily("vkmmu_vms_loaded", f"VMs held in memory by this process {own}")
        loaded.add_metric([], self.loaded)
        yield loaded
        memslots = GaugeMetricFamily("vkmmu_memslots", f"Memslots of all live VMs {own}")
        memslots.add_metric([], sum(int(s.get("memslots") or 0) for s in self.summaries.values()))
        yield memslots
        tb = GaugeMetricFamily(
            "vkmmu_page_table_bytes", f"Page-table memory of the VMs loaded in memory {own}"
        )
        tb.add_metric([], self.table_bytes)
        yield tb
        budget = GaugeMetricFamily(
            "vkmmu_page_table_budget_bytes",
            f"The service's page-table budget (VKMMU_PAGE_TABLE_BUDGET_BYTES) {own}",
        )
        budget.add_metric([], self.budget_bytes)
        yield budget
        yield from self._present_sptes()
        yield from self._tdx_ops()
        if self.bus is not None:
            subs = GaugeMetricFamily("vkmmu_event_subscribers", f"Open event streams {own}")
            subs.add_metric([], self.bus.subscribers)
            yield subs
            dropped = CounterMetricFamily(
                "vkmmu_event_clients_dropped",
                f"Event streams ended because the client fell behind {own}",
            )
            dropped.add_metric([], self.bus.dropped_total)
            yield dropped
        yield from self._per_vm()

    def _present_sptes(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "vkmmu_sptes",
            "Present leaf SPTEs of all live VMs, by root role and level (vkmmu's own figure; "
            "a TD's private leaves are in its mirror root, other VMs' in the direct root)",
            labels=["root", "level"],
        )
        totals = {(r, lv): 0 for r in ROOTS for lv in LEVELS}
        for st in self.stats.values():
            td = "tdx_reaccepts" in st  # only a TD reports TDX counters
            for lv in LEVELS:
                if td:
                    totals["direct", lv] += int(st.get(f"shared_pages_{lv}", 0))
                    totals["mirror", lv] += int(st.get(f"private_pages_{lv}", 0))
                else:
                    totals["direct", lv] += int(st.get(f"pages_{lv}", 0))
        for (root, lv), n in totals.items():
            fam.add_metric([root, lv], n)
        yield fam

    def _tdx_ops(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "vkmmu_tdx_sept_ops",
            "S-EPT SEAMCALLs made by the live TDs so far, summed over them (vkmmu's own "
            "figure; it falls when a TD is deleted, so it is a gauge)",
            labels=["op"],
        )
        ops: dict[str, float] = {}
        for st in self.stats.values():
            for k, v in st.items():
                if k.startswith("tdx_") and k not in ("tdx_reaccepts", "tdx_accepted_pages"):
                    if isinstance(v, int | float):
                        ops[k[4:]] = ops.get(k[4:], 0) + v
        for op, n in sorted(ops.items()):
            fam.add_metric([op], n)
        yield fam

    def _per_vm(self) -> Iterator[Metric]:
        # VM ids sort by creation time: the newest `max_vms` keep their series.
        ids = sorted(self.stats, reverse=True)
        shown = ids[: self.max_vms]
        omitted = GaugeMetricFamily(
            "vkmmu_metrics_vms_omitted",
            "Live VMs without per-VM series (over VKMMU_METRICS_MAX_VMS, oldest first) "
            "(vkmmu's own figure)",
        )
        omitted.add_metric([], len(ids) - len(shown))
        yield omitted
        for name in PER_VM_STATS:
            if is_cumulative(name):
                fam: Metric = CounterMetricFamily(
                    f"vkmmu_vm_{name}",
                    f"The kernel's stat {name} of each VM (cumulative since the VM was created)",
                    labels=["vm"],
                )
            else:
                fam = GaugeMetricFamily(
                    f"vkmmu_vm_{name}", f"The kernel's stat {name} of each VM", labels=["vm"]
                )
            for vm_id in shown:
                v = self.stats[vm_id].get(name)
                if isinstance(v, int | float):
                    fam.add_metric([vm_id], float(v))  # type: ignore[attr-defined]
            yield fam
