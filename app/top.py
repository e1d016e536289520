"""`vkmmu top`: the kernel's stat names and vkmmu's zap counters, refreshed in the terminal
like `kvm_stat` (Total since the VM was created, Current per second over the last interval).

It talks to a running service over HTTP only (`GET /v1/vms`, `GET /v1/vms/{vm}/stats`).
Without `--vm` the rows are summed over the VMs (at most `--max-vms`, newest first) and a
second table lists the VMs themselves.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from app.engine.stats import KVM_STAT_NAMES, VCPU_STAT_NAMES

# vkmmu's own counters shown after the kernel's names (marked so in the table).
OWN_STATS = (
    "zaps_all_fast",
    "zaps_slot_leafs",
    "zaps_range",
    "zaps_notifier",
    "zaps_total_sptes",
    "refaults",
    "mmio_sptes",
    "zapped_not_refaulted",
    "page_tables",
    "roots",
)
ROWS = KVM_STAT_NAMES + VCPU_STAT_NAMES + OWN_STATS

Fetch = Callable[[str], Any]


def http_fetch(base: str, timeout: float = 10.0, token: str | None = None) -> Fetch:
    """GET `path` of the service as JSON, with `token` as the bearer token when given."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def fetch(path: str) -> Any:
        req = urllib.request.Request(base.rstrip("/") + path, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    return fetch


@dataclass
class Sample:
    at: float
    per_vm: dict[str, dict[str, Any]]  # vm id -> stats
    info: dict[str, dict[str, Any]]  # vm id -> VM info


def sample(fetch: Fetch, vm: str | None, max_vms: int) -> Sample:
    if vm is not None:
        info = {vm: fetch(f"/v1/vms/{urllib.parse.quote(vm)}")}
    else:
        info = {}
        cursor: str | None = None
        while True:
            q = {"limit": "500", **({"cursor": cursor} if cursor else {})}
            page = fetch(f"/v1/vms?{urllib.parse.urlencode(q)}")
            info.update({v["id"]: v for v in page["items"]})
            cursor = page.get("next_cursor")
            if not cursor:
                break
        info = {k: info[k] for k in sorted(info, reverse=True)[:max_vms]}
    per_vm = {}
    for vm_id in info:
        try:
            per_vm[vm_id] = fetch(f"/v1/vms/{urllib.parse.quote(vm_id)}/stats")
        except urllib.error.HTTPError as e:
            if e.code != 404:  # deleted between the list and now
                raise
    return Sample(time.monotonic(), per_vm, info)


def totals(s: Sample) -> dict[str, float]:
    out: dict[str, float] = {}
    for stats in s.per_vm.values():
        for name in ROWS:
            v = stats.get(name)
            if isinstance(v, int | float):
                out[name] = out.get(name, 0) + v
    return out


def render(prev: Sample | None, cur: Sample, title: str) -> Group:
    now = totals(cur)
    before = totals(prev) if prev is not None else {}
    dt = (cur.at - prev.at) if prev is not None else 0.0
    grand = sum(now.get(n, 0) for n in KVM_STAT_NAMES + VCPU_STAT_NAMES) or 1
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("Event")
    table.add_column("Total", justify="right")
    table.add_column("%Total", justify="right")
    table.add_column("CurAvg/s", justify="right")
    rows = []
    for name in ROWS:
        if name not in now:
            continue
        rate = (now[name] - before.get(name, now[name])) / dt if dt > 0 else 0.0
        rows.append((name, now[name], rate))
    # As kvm_stat: the busiest first, then by total; vkmmu's own counters last.
    kernel = [r for r in rows if r[0] not in OWN_STATS]
    kernel.sort(key=lambda r: (-r[2], -r[1], r[0]))
    own = [r for r in rows if r[0] in OWN_STATS]
    for name, total, rate in kernel:
        pct = (
            f"{100 * total / grand:.1f}" if name not in ("pages_4k", "pages_2m", "pages_1g") else ""
        )
        table.add_row(name, f"{total:.0f}", pct, f"{rate:.0f}" if dt else "")
    for name, total, rate in own:
        table.add_row(f"[dim]{name} (vkmmu)[/dim]", f"{total:.0f}", "", f"{rate:.0f}" if dt else "")
    vms = Table(title=f"{len(cur.per_vm)} VM(s)", title_justify="left")
    for col in ("VM", "type", "pages 4K/2M/1G", "remote_tlb_flush", "zaps", "refaults"):
        vms.add_column(col, justify="left" if col in ("VM", "type") else "right")
    for vm_id, st in cur.per_vm.items():
        zaps = sum(int(st.get(k, 0)) for k in OWN_STATS[:4])
        vms.add_row(
            vm_id,
            str(cur.info.get(vm_id, {}).get("vm_type_name", "")),
            f"{st.get('pages_4k', 0)}/{st.get('pages_2m', 0)}/{st.get('pages_1g', 0)}",
            str(st.get("remote_tlb_flush", 0)),
            str(zaps),
            str(st.get("refaults", 0)),
        )
    return Group(table, vms)


def run(
    url: str,
    vm: str | None = None,
    *,
    interval: float = 2.0,
    once: bool = False,
    max_vms: int = 50,
    console: Console | None = None,
    fetch: Fetch | None = None,
    token: str | None = None,
) -> int:
    console = console or Console()
    fetch = fetch or http_fetch(url, token=token)
    title = f"vkmmu top — {url}" + (f" — {vm}" if vm else " — all VMs")
    prev = sample(fetch, vm, max_vms)
    if once:
        # Two samples one interval apart, printed once (kvm_stat -1).
        time.sleep(interval)
        console.print(render(prev, sample(fetch, vm, max_vms), title))
        return 0
    with Live(render(None, prev, title), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                cur = sample(fetch, vm, max_vms)
                live.update(render(prev, cur, title), refresh=True)
                prev = cur
        except KeyboardInterrupt:
            return 0
