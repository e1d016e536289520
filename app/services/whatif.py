"""What-if: the same operations run on in-memory forks of a VM, one per variant.

The VM is copied once, under its lock, with the engine's codec (`dumps`); each variant
gets its own fork (`loads`), never persisted, with the variant's disabled-quirk mask (a
what-if may re-enable a quirk, which KVM cannot: it is a hypothesis), zap policy, and
optionally another VM type (from an empty VM only: a snapshot cannot change type). The VM
itself is never changed.

Forks are counted in the service's one memory ledger (app/services/budget.py), as a VM
is: a fork reserves its copy's footprint (ENOMEM before decoding anything when it does not
fit what loaded VMs, calls in flight and other forks leave) and half of the page tables
left free, which is the table budget its operations build within (past it they answer
ENOMEM, as a VM past its budget does). A what-if a tenant's token asks for also counts each
fork's page tables and contents in that tenant's quotas while the fork exists (ENOMEM, 507,
before the fork is built, when they do not fit beside what the tenant's VMs hold), and the
tables the fork may build stop at what the page-table quota leaves.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

from app.engine.errors import KvmError
from app.engine.host_profile import host_profile
from app.services import budget, cost_model
from app.services.errors import PreconditionFailed
from app.services.qemu_trace import Trace
from app.services.quotas import PAGE, TABLE_BYTES, acting_tenant
from app.services.replay import OpError, ReplayPlan, Touch, engine_call, errno_name, run_local
from app.services.vms import etag_matches

DEFAULT_MAX_VARIANTS = 8
DEFAULT_MAX_OPS = 100_000
ZAP_POLICIES = ("kvm", "zap_all_shared_only")


class WhatIfError(ValueError):
    """A what-if request that cannot run as asked (HTTP 422)."""


@dataclass(frozen=True)
class Variant:
    name: str
    disable_quirks: int | None = None  # None: the VM's own mask
    vm_type: int | None = None
    zap_policy: str | None = None
    host: dict[str, bool] | None = None  # over the VM's own host profile


class _OpsFeed:
    """Plain operations, in order; outcomes counted."""

    def __init__(self, calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.calls = calls
        self.i = 0
        self.ok = 0
        self.failed: list[dict[str, Any]] = []

    def next_call(self) -> tuple[str, dict[str, Any]] | None:
        if self.i >= len(self.calls):
            return None
        name, args = self.calls[self.i]
        self.i += 1
        return name, dict(args)

    def record(self, outcome: Any) -> None:
        if isinstance(outcome, KvmError):
            if len(self.failed) < 20:
                self.failed.append(
                    {
                        "index": self.i - 1,
                        "errno": outcome.errno,
                        "errno_name": errno_name(outcome.errno),
                        "detail": outcome.detail,
                    }
                )
            else:
                self.failed.append({})
        else:
            self.ok += 1


def parse_ops(ops: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, op in enumerate(ops):
        try:
            out.append(engine_call(op))
        except OpError as e:
            raise WhatIfError(f"ops[{i}]: {e}") from None
    return out


def _zap_totals(events: list[dict[str, Any]]) -> dict[str, Any]:
    levels = ("4k", "2m", "1g")
    by_root = {r: dict.fromkeys(levels, 0) for r in ("direct", "mirror")}
    totals = dict.fromkeys(
        ("tables_freed", "roots_invalidated", "tlb_flushes", "vcpu_kicks", "sptes_zapped_total"),
        0,
    )
    paths: dict[str, int] = {}
    for ev in events:
        for r in by_root:
            for lv in levels:
                by_root[r][lv] += int(ev["sptes_zapped"][r][lv])
        for k in totals:
            totals[k] += int(ev[k])
        paths[ev["path"]] = paths.get(ev["path"], 0) + 1
    by_level = {lv: by_root["direct"][lv] + by_root["mirror"][lv] for lv in levels}
    return {
        "zaps": len(events),
        "zaps_by_path": paths,
        "sptes_zapped": {**by_level, "direct": by_root["direct"], "mirror": by_root["mirror"]},
        **totals,
    }


def _delta(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    return int(after.get(name, 0)) - int(before.get(name, 0))


def run_variant(
    engine: Any,
    base: bytes,
    source: dict[str, Any],
    variant: Variant,
    calls: list[tuple[str, dict[str, Any]]] | None,
    trace: Trace | None,
    touch: Touch,
    budget_tables: int,
    costs: dict[str, float | None],
) -> dict[str, Any]:
    """One fork: build it, run the operations, count (in a worker thread)."""
    if variant.vm_type is not None and variant.vm_type != source["vm_type"]:
        fork = engine.create(
            vm_type=variant.vm_type,
            vcpus=source["vcpus"],
            paging_levels=source["paging_levels"],
            name=None,
        )
    else:
        fork = engine.loads(base)
    if variant.disable_quirks is not None:
        fork.disabled_quirks = variant.disable_quirks
    if variant.zap_policy is not None:
        fork.zap_policy = variant.zap_policy
    if variant.host is not None:
        fork.host_profile = host_profile(variant.host, fork.host_profile)
    engine.set_table_budget(fork, budget_tables)
    before = fork.stats()
    first_event = fork.event_seq
    at = time.time()
    started = time.perf_counter()
    row: dict[str, Any] = {"name": variant.name}
    if trace is not None:
        plan = ReplayPlan(trace.calls, touch)
        run_local(fork, plan, at=at)
        answer = plan.answer(trace)
        row["ops_applied"] = answer["applied"] + answer["touch"]["accesses"]
        row["ops_failed"] = sum(1 for r in answer["results"] if not r["ok"])
        row["trace_mismatches"] = answer["mismatches"]
        row["first_failures"] = [
            {
                "index": r["line"],
                "errno": r["errno"],
                "errno_name": r["errno_name"],
                "detail": r["detail"],
            }
            for r in answer["results"]
            if not r["ok"]
        ][:20]
    else:
        feed = _OpsFeed(calls or [])
        run_local(fork, feed, at=at)
        row["ops_applied"] = len(feed.calls)
        row["ops_failed"] = len(feed.failed)
        row["trace_mismatches"] = None
        row["first_failures"] = [f for f in feed.failed if f][:20]
    wall_ms = (time.perf_counter() - started) * 1000
    after = fork.stats()
    events = [ev for ev in fork.events if ev["seq"] > first_event]
    sept = {
        k[len("tdx_") :]: _delta(before, after, k)
        for k in after
        if k.startswith("tdx_") and k not in ("tdx_accepted_pages", "tdx_reaccepts")
    }
    row.update(
        {
            "vm_type": int(fork.vm_type),
            "vm_type_name": fork.vm_type.name,
            "disabled_quirks": int(fork.disabled_quirks),
            "slot_zap_all": bool(fork.info()["slot_zap_all_applies"]),
            "zap_policy": fork.zap_policy,
            "host": fork.host_profile.to_dict(),
            **_zap_totals(events),
            "faults": _delta(before, after, "pf_taken"),
            "faults_fixed": _delta(before, after, "pf_fixed"),
            "refaults": _delta(before, after, "refaults"),
            "mmio_sptes": _delta(before, after, "mmio_sptes"),
            "remote_tlb_flush": _delta(before, after, "remote_tlb_flush"),
            "sept_operations": sept,
            "sept_operations_total": sum(sept.values()),
            "tdx_reaccepts": _delta(before, after, "tdx_reaccepts"),
            "audit_violations": len(fork.audit()["violations"]),
            "page_tables": int(after.get("page_tables", 0)),
            "model_wall_ms": round(wall_ms, 3),
            "final_memslots": [
                {
                    "slot": m["slot"],
                    "flags": m["flags"],
                    "guest_phys_addr": m["guest_phys_addr"],
                    "memory_size": m["memory_size"],
                    "userspace_addr": m["userspace_addr"],
                }
                for m in fork.memslots()
            ],
        }
    )
    row["estimate"] = cost_model.estimate(row, costs)
    return row


async def what_if(
    service: Any,
    vm_id: str,
    *,
    variants: list[Variant],
    ops: list[Any] | None = None,
    trace: Trace | None = None,
    touch: Touch | None = None,
    costs: dict[str, float] | None = None,
    max_variants: int = DEFAULT_MAX_VARIANTS,
    max_ops: int = DEFAULT_MAX_OPS,
    progress: Any = None,
    if_match: str | None = None,
) -> dict[str, Any]:
    if not variants:
        raise WhatIfError("at least one variant")
    if len(variants) > max_variants:
        raise WhatIfError(
            f"{len(variants)} variants: at most {max_variants} (VKMMU_WHATIF_MAX_VARIANTS)"
        )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise WhatIfError("variant names must be unique")
    for v in variants:
        if v.zap_policy is not None and v.zap_policy not in ZAP_POLICIES:
            raise WhatIfError(f"variant {v.name!r}: zap_policy must be one of {ZAP_POLICIES}")
        if v.host is not None:
            host_profile(v.host)  # tdp_mmu false: EOPNOTSUPP before any fork is built
    if (ops is None) == (trace is None):
        raise WhatIfError("give either ops or a trace")
    n_ops = len(ops) if ops is not None else len(trace.calls if trace else [])
    if n_ops > max_ops:
        raise WhatIfError(f"{n_ops} operations: at most {max_ops} (VKMMU_WHATIF_MAX_OPS)")
    calls = parse_ops(ops) if ops is not None else None
    try:
        resolved = cost_model.resolve(costs)
    except cost_model.CostError as e:
        raise WhatIfError(str(e)) from None
    engine = service.engine
    ledger = service.ledger
    # The copy's bytes are held for the whole what-if: reserved before it is written.
    copy_key = f"what-if-copy:{secrets.token_hex(8)}"

    def copy(vm: Any) -> tuple[bytes, int, dict[str, Any]]:
        info = vm.info()
        src = {k: info[k] for k in ("vm_type", "vcpus", "paging_levels")}
        src["memslots"] = info["memslots"]
        grant = ledger.reserve(copy_key, budget.snapshot_need(vm))
        data = engine.dumps(vm)
        ledger.settle(copy_key, grant, len(data))
        return data, int(engine.tables_live(vm)), src

    try:
        return await _run_variants(
            service, vm_id, copy, variants, calls, trace, touch, resolved, progress, if_match, n_ops
        )
    finally:
        ledger.forget(copy_key)


async def _run_variants(
    service: Any,
    vm_id: str,
    copy: Any,
    variants: list[Variant],
    calls: list[tuple[str, dict[str, Any]]] | None,
    trace: Trace | None,
    touch: Touch | None,
    resolved: dict[str, float | None],
    progress: Any,
    if_match: str | None,
    n_ops: int,
) -> dict[str, Any]:
    """Copy the VM once (`copy`, under its lock), then run each variant on a fork of it."""
    engine, ledger = service.engine, service.ledger
    (base, tables, source), tag = await service.read(vm_id, copy)
    if if_match is not None and not etag_matches(if_match, int(tag.strip('"'))):
        raise PreconditionFailed(if_match, tag)
    for v in variants:
        if v.vm_type is not None and v.vm_type != source["vm_type"] and source["memslots"]:
            raise WhatIfError(
                f"variant {v.name!r}: vm_type may differ from the VM's only while the VM has no "
                "memslots (the fork then starts as an empty VM of that type); a copy of a VM "
                "cannot change its type"
            )
    footprint = engine.snapshot_footprint(base)
    copy_need = budget.footprint_need(footprint)
    # A tenant's what-if: each fork counts in its quotas too, as a VM of its own would.
    tenant = acting_tenant.get()
    usage = None if tenant is None else await asyncio.to_thread(service.tenant_usage, tenant)
    rows = []
    for i, v in enumerate(variants):
        key = f"what-if:{secrets.token_hex(8)}"
        grants = [ledger.reserve(key, copy_need)]  # ENOMEM: the copy does not fit
        try:
            # What the fork's operations may build: half of the tables left free, and no
            # more than the tenant's page-table quota leaves.
            build = ledger.free_tables(key) // 2
            if usage is not None and tenant is not None:
                build = usage.reserve_copy(
                    tenant,
                    key,
                    int(footprint.get("tables", 0)) * TABLE_BYTES,
                    int(footprint.get("content_pages", 0)) * PAGE,
                    build,
                )
            grants.append(ledger.reserve(key, budget.Need(0, build, False)))
            row = await asyncio.to_thread(
                run_variant,
                engine,
                base,
                source,
                v,
                calls,
                trace,
                touch or Touch(),
                tables + grants[1].tables,
                resolved,
            )
        finally:
            for g in grants:
                ledger.settle(key, g, 0)
            ledger.forget(key)
            if usage is not None:
                usage.forget(key)
        rows.append(row)
        if progress is not None:
            await progress(i + 1, len(variants))
    return {
        "vm": vm_id,
        "version": tag,
        "ops": n_ops,
        "source": "trace" if trace is not None else "ops",
        "touch": (touch or Touch()).describe() if trace is not None else None,
        "variants": rows,
        "costs": [{**c, "ns": resolved[c["name"]]} for c in cost_model.describe()],
        "estimate_note": "estimates are a model: counts times per-event costs, each cost's "
        "source in docs/cost-model.md; costs without a published figure are not estimated",
    }
