"""Limits of the whole service: the page-table budget is shared by every loaded VM, the
number of VMs held in memory is capped (LRU eviction), and /metrics still reports evicted VMs.
"""

from __future__ import annotations

import errno
import gc
import re
import weakref
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.engine import paging

from .helpers import MiB, assert_errno, etag, new_vm, ok, put_slot, state

TABLE = 4096


async def map_range(client: httpx.AsyncClient, vm: str, gpa: int, size: int) -> httpx.Response:
    return await client.post(
        f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": gpa, "size": size, "access": "write"}
    )


async def test_page_table_budget_is_for_the_whole_service(
    make_client: Callable[..., Any],
) -> None:
    # 8 tables for the service. Mapping 4 MiB in 4 KiB pages takes 5 (PML4, PDPT, PD and two
    # PTs), and a 2 MiB access may need 5: each VM alone fits, both together do not.
    client = await make_client(page_table_budget_bytes=8 * TABLE)
    a, b = await new_vm(client, name="a"), await new_vm(client, name="b")
    for vm in (a, b):
        ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
    ok(await map_range(client, a, 0, 4 * MiB))
    assert ok(await client.get(f"/v1/vms/{a}/stats"))["page_tables"] == 5

    before = await state(client, b)
    stats_before = ok(await client.get(f"/v1/vms/{b}/stats"))
    body = assert_errno(await map_range(client, b, 0, 2 * MiB), errno.ENOMEM)
    assert "state_changed" not in body
    # Refused before anything was allocated: no new version, no table, no mapping.
    assert await state(client, b) == before
    assert ok(await client.get(f"/v1/vms/{b}/stats")) == stats_before
    assert ok(await client.get(f"/v1/vms/{b}/mappings"))["items"] == []

    # Once A is gone its tables are free again, and B's call fits.
    ok(await client.delete(f"/v1/vms/{a}"))
    r = await map_range(client, b, 0, 2 * MiB)
    assert ok(r)["mapped"] == 512
    assert etag(r) != before["etag"]


async def test_loaded_vms_are_capped_least_recently_used_first(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(max_loaded_vms=2)
    service = client.app.state.service  # type: ignore[attr-defined]
    vms = [await new_vm(client, name=f"vm{i}") for i in range(3)]
    for i, vm in enumerate(vms):
        ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
        ok(await map_range(client, vm, 0, (i + 1) * 4096))
    # vm0 was used least recently: it went first.
    assert sorted(service.loaded_vms()) == sorted(vms[1:])
    # It comes back from its journal as it was, and pushes out the next least recent (vm1).
    assert ok(await client.get(f"/v1/vms/{vms[0]}/stats"))["pages_4k"] == 1
    assert sorted(service.loaded_vms()) == sorted([vms[0], vms[2]])
    assert ok(await client.get(f"/v1/vms/{vms[1]}/stats"))["pages_4k"] == 2


async def test_a_deleted_or_evicted_vm_frees_its_tables_at_once(
    make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freed when the service lets go, not at the collector's next full run: the budget
    releases them then, so memory must follow."""
    pools: list[weakref.ref[paging.TablePool]] = []
    init = paging.TablePool.__init__

    def tracked(self: paging.TablePool) -> None:
        init(self)
        pools.append(weakref.ref(self))

    monkeypatch.setattr(paging.TablePool, "__init__", tracked)
    client = await make_client(max_loaded_vms=1)
    gone, evicted = await new_vm(client, name="gone"), await new_vm(client, name="evicted")
    for vm in (gone, evicted):
        ok(await put_slot(client, vm, 0, gpa=0, size=4 * MiB))
        ok(await map_range(client, vm, 0, 4 * MiB))
    gc.collect()
    gc.disable()
    try:
        ok(await client.delete(f"/v1/vms/{gone}"))
        await new_vm(client, name="next")  # pushes `evicted` out of memory
        assert [p for p in pools if p() is not None] == pools[-1:]  # only the new VM's
    finally:
        gc.enable()


def metric(text: str, name: str, vm: str) -> float | None:
    m = re.search(rf'^{name}{{vm="{vm}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def metric_type(text: str, name: str) -> str | None:
    m = re.search(rf"^# TYPE {name} (\w+)$", text, re.M)
    return m.group(1) if m else None


async def test_metrics_counters_gauges_and_vms_not_loaded(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client()
    service = client.app.state.service  # type: ignore[attr-defined]
    vm = await new_vm(client)
    ok(await put_slot(client, vm, 0, gpa=0, size=MiB))
    ok(await map_range(client, vm, 0, 4 * 4096))
    ok(await client.post(f"/v1/vms/{vm}/zaps", json={"scope": "all", "roots": "shared"}))
    ok(await map_range(client, vm, 0, 4096))
    stats = ok(await client.get(f"/v1/vms/{vm}/stats"))
    assert service.evict(vm) and vm not in service.loaded_vms()

    text = (await client.get("/metrics")).text
    assert vm not in service.loaded_vms()  # a scrape loads nothing
    # Per VM only the kernel's stat names (docs/metrics.md): cumulative ones are counters
    # (`_total`), present state gauges. vkmmu's own counts are aggregated, not per VM.
    for name in ("remote_tlb_flush", "pf_taken", "pf_fixed"):
        assert metric_type(text, f"vkmmu_vm_{name}_total") == "counter", name
        assert metric(text, f"vkmmu_vm_{name}_total", vm) == stats[name], name
        assert metric(text, f"vkmmu_vm_{name}", vm) is None
    for name in ("pages_4k", "max_mmu_rmap_size"):
        assert metric_type(text, f"vkmmu_vm_{name}") == "gauge", name
        assert metric(text, f"vkmmu_vm_{name}", vm) == stats[name], name
    for name in ("refaults", "zaps_all_fast", "page_tables", "roots", "zapped_not_refaulted"):
        assert metric(text, f"vkmmu_vm_{name}_total", vm) is None, name
        assert metric(text, f"vkmmu_vm_{name}", vm) is None, name
    assert stats["refaults"] == 1 and stats["pages_4k"] == 1 and stats["zaps_all_fast"] == 1
    assert "vkmmu_vms 1.0" in text and "vkmmu_vms_loaded 0.0" in text
    # The stats kept for /metrics are not part of the VM's own answer.
    assert "stats" not in ok(await client.get(f"/v1/vms/{vm}"))
    ok(await client.delete(f"/v1/vms/{vm}"))
    assert f'vm="{vm}"' not in (await client.get("/metrics")).text
