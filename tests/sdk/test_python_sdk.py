"""A Python client generated from openapi/openapi.json with openapi-python-client (zero
warnings), driven against the app in-process: the spec is what SDK users get."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "sdk"
PACKAGE = "vkmmu_sdk"
SPEC = ROOT / "openapi" / "openapi.json"


@pytest.fixture(scope="module")
def sdk() -> Any:
    exe = Path(sys.executable).parent / "openapi-python-client"
    out = BUILD / PACKAGE
    shutil.rmtree(out, ignore_errors=True)
    env = os.environ | {"PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(
        [str(exe), "generate", "--path", str(SPEC), "--output-path", str(out), "--meta", "none"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    text = (run.stdout + run.stderr).lower()
    # The one known gap: the generator has no text bodies, and a trace replay's body is a
    # QEMU trace (text/plain or JSON lines); SDK users send it with `vkmmu replay` or httpx.
    known = (
        "warning(s) encountered while generating. client was generated, but some pieces may "
        "be missing",
        "warning parsing post /v1/vms/{vm}/replay within replay. endpoint will not be generated.",
        "unsupported content type text/plain",
        "unsupported content type application/x-ndjson",
    )
    for line in known:
        text = text.replace(line, "")
    assert "warning" not in text and "error" not in text, run.stdout + run.stderr
    sys.path.insert(0, str(BUILD))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(BUILD))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


async def test_every_operation_through_the_generated_client(sdk: Any, make_client: Any) -> None:
    http = await make_client()
    api = sdk.Client(base_url="http://vkmmu.test")
    api.set_async_httpx_client(
        httpx.AsyncClient(transport=http._transport, base_url="http://vkmmu.test")
    )
    m = importlib.import_module(f"{PACKAGE}.models")
    used: set[str] = set()

    async def call(group: str, op: str, *args: Any, status: int = 200, **kw: Any) -> Any:
        fn: Callable[..., Any] = importlib.import_module(
            f"{PACKAGE}.api.{group}.{op}"
        ).asyncio_detailed
        used.add(op)
        r = await fn(*args, client=api, **kw)
        assert r.status_code == status, r.content[:500]
        streams = ("zaps_stream", "events_stream", "vm_events_stream", "metrics_get")
        assert r.parsed is not None or op in (*streams, "snapshots_delete"), op
        return r.parsed

    await call("health", "health_get")
    await call("health", "readiness_get")
    caps = await call("capabilities", "capabilities_get")
    assert caps.kvm_cap_nr_memslots > 0
    await call("stats", "stat_descriptors_list")
    vm = (await call("vms", "vms_create", body=m.VmCreate(name="sdk", vcpus=1), status=201)).id
    td_body = m.VmCreate(vm_type="KVM_X86_TDX_VM")
    td = (await call("vms", "vms_create", body=td_body, status=201)).id
    assert len((await call("vms", "vms_list")).items) == 2
    await call("vms", "vms_get", vm)
    await call("vms", "vm_capabilities_get", vm)
    state = await call(
        "vms", "vms_enable_cap", vm, body=m.EnableCap(cap="KVM_CAP_DISABLE_QUIRKS2", args=[0])
    )
    assert state.quirks.disabled_mask == 2  # CD_NW_CLEARED never applies on Intel
    await call("vms", "quirks_get", vm)
    await call("vms", "vcpus_create", vm, body=m.VcpuCreate(id=1), status=201)
    await call("vms", "vcpus_list", vm)
    await call("vms", "vcpus_set_smm", vm, 1, body=m.VcpuSmm(smm=False))

    hva = 0x7F00_0000_0000
    region = m.MemoryRegion(guest_phys_addr=0, memory_size=4 << 20, userspace_addr=hva)
    change = await call("memslots", "memslots_set", vm, 0, body=region)
    assert change.change == m.MemslotChangeChange.CREATE
    await call("memslots", "memslots_get", vm, 0)
    await call("memslots", "memslots_list", vm)
    extra = [
        m.BatchRegion(slot=7, guest_phys_addr=1 << 32, memory_size=1 << 20, userspace_addr=hva),
        m.BatchRegion(slot=7, guest_phys_addr=1 << 32, memory_size=0, userspace_addr=hva),
    ]
    done = await call("memslots", "memslots_batch", vm, body=m.MemslotBatch(regions=extra))
    assert [x.change for x in done.results] == ["create", "delete"] and done.applied == 2
    done = await call(
        "guest", "guest_access", vm, 0, body=m.Access(gpa=0, size=8192, access=m.AccessAccess.WRITE)
    )
    assert done.mapped == 2 and done.levels.field_4k == 2
    await call("guest", "guest_store", vm, 0, body=m.Store(gpa=16, data="c0ffee"))
    assert (await call("guest", "guest_load", vm, 0, body=m.Load(gpa=16, len_=3))).data == "c0ffee"
    await call("guest", "guest_pre_fault", vm, 0, body=m.PreFault(gpa=0x10000, size=4096))
    walk = await call("introspection", "translate_get", vm, gpa=0)
    assert walk.roots[0].leaf.hva == hva
    await call("introspection", "mappings_list", vm)
    await call("introspection", "roots_list", vm)
    stats = await call("introspection", "stats_get", vm)
    assert stats.pages_4k >= 2
    assert (await call("introspection", "audit_get", vm)).ok
    await call(
        "host_memory", "host_memory_write", vm, body=m.HostWrite(userspace_addr=hva, data="aa")
    )
    await call("host_memory", "host_memory_read", vm, body=m.HostRead(userspace_addr=hva, len_=1))
    adv = m.HostAdvise(userspace_addr=hva, len_=2 << 20, advice=m.HostAdviseAdvice.HUGEPAGE)
    await call("host_memory", "host_memory_advise", vm, body=adv)
    hmap = m.HostMap(
        userspace_addr=hva + (8 << 20), len_=2 << 20, page_size=m.HostMapPageSize.VALUE_2097152
    )
    await call("host_memory", "host_memory_map", vm, body=hmap)
    disc = await call(
        "host_memory", "host_memory_discard", vm, body=m.HostDiscard(userspace_addr=hva, len_=4096)
    )
    assert disc.zap.cause == "mmu_notifier"
    flags = m.MemoryRegion(guest_phys_addr=0, memory_size=4 << 20, userspace_addr=hva, flags=1)
    await call("memslots", "memslots_set", vm, 0, body=flags)
    await call("memslots", "dirty_log_get", vm, 0)
    clear = m.DirtyLogClear(num_pages=64, bitmap="AAAAAAAAAAA=")
    await call("memslots", "dirty_log_clear", vm, 0, body=clear)
    zap = await call(
        "zaps",
        "zaps_create",
        vm,
        body=m.ZapRequest(scope=m.ZapRequestScope.ALL, roots=m.ZapRequestRoots.SHARED),
    )
    assert zap.path == "zap_all_fast" and zap.at.tzinfo is not None
    events = await call("zaps", "zaps_list", vm, cause="explicit")
    assert [e.seq for e in events.items] == [zap.seq]
    await call("zaps", "zaps_stream", vm, timeout=0.3)
    log = await call("trace", "trace_get", vm, format_=m.TraceGetFormat.JSON, limit=5)
    assert len(log.records) == 5 and log.records[-1].event == "kvm_tdp_mmu_spte_changed"
    await call("zaps", "zap_policy_set", vm, body=m.ZapPolicy(policy=m.ZapPolicyPolicy.KVM))
    snap = await call(
        "snapshots", "snapshots_create", vm, body=m.SnapshotCreate(label="tour"), status=201
    )
    assert (await call("snapshots", "snapshots_get", vm, snap.id)).label == "tour"
    await call("snapshots", "snapshots_list", vm)
    await call("snapshots", "snapshots_restore", vm, snap.id)
    extra = await call("snapshots", "snapshots_create", vm, body=m.SnapshotCreate(), status=201)
    await call("snapshots", "snapshots_delete", vm, extra.id, status=204)
    whatif = m.WhatIfRequest.from_dict(
        {
            "ops": [{"op": "delete_memslot", "slot": 0}],
            "variants": [
                {"name": "on", "disable_quirks": 0},
                {"name": "off", "disable_quirks": 128},
            ],
        }
    )
    answer = await call("replay", "whatif_run", vm, body=whatif)
    assert [v.name for v in answer.variants] == ["on", "off"]
    await call("events", "events_stream", timeout=0.2, after=0)
    await call("events", "vm_events_stream", vm, timeout=0.2, after=0)
    deleted = await call("memslots", "memslots_delete", vm, 0)
    assert deleted.zap.slot == 0

    gm = await call(
        "guest_memfds", "guest_memfds_create", td, body=m.GmemCreate(size=4 << 20), status=201
    )
    await call("guest_memfds", "guest_memfds_list", td)
    td_region = m.MemoryRegion(
        guest_phys_addr=0, memory_size=4 << 20, userspace_addr=hva, flags=4, guest_memfd=gm.fd
    )
    await call("memslots", "memslots_set", td, 0, body=td_region)
    attrs = m.SetAttributes(address=0, size=4 << 20, attributes=8)
    await call("memory_attributes", "memory_attributes_set", td, body=attrs)
    await call("memory_attributes", "memory_attributes_list", td)
    await call("guest", "guest_accept", td, 0, body=m.Accept(gpa=0))
    await call("introspection", "tdx_get", td)
    punch = m.Fallocate(mode=m.FallocateModeType0.PUNCH_HOLE, offset=0, len_=4096)
    await call("guest_memfds", "guest_memfds_fallocate", td, gm.fd, body=punch)
    v2 = (await call("vms", "vms_create", body=m.VmCreate(), status=201)).id
    shared = m.GmemCreate(size=1 << 20, flags=3)
    g2 = await call("guest_memfds", "guest_memfds_create", v2, body=shared, status=201)
    await call(
        "guest_memfds", "guest_memfds_write", v2, g2.fd, body=m.GmemWrite(offset=0, data="ab")
    )
    assert (
        await call(
            "guest_memfds", "guest_memfds_read", v2, g2.fd, body=m.GmemRead(offset=0, len_=1)
        )
    ).data == "ab"
    await call("guest_memfds", "guest_memfds_close", td, gm.fd)

    # The TD lifecycle, MapGPA and NX huge page recovery.
    life_body = m.VmCreate(vm_type="KVM_X86_TDX_VM", vcpus=0, td_lifecycle=True)
    life = (await call("vms", "vms_create", body=life_body, status=201)).id
    await call("tdx", "tdx_init_vm", life, body=m.TdxInitVm(attributes=0))
    await call("vms", "vcpus_create", life, body=m.VcpuCreate(id=0), status=201)
    await call("tdx", "tdx_init_vcpu", life, 0, body=m.TdxInitVcpu())
    region = m.TdxInitMemRegion(source_addr=hva, gpa=0, nr_pages=1)
    await call("tdx", "tdx_init_mem_region", life, 0, body=region, status=400)  # no slot
    assert (await call("tdx", "tdx_finalize_vm", life)).td_state == "runnable"
    mapped = await call("tdx", "guest_map_gpa", td, 0, body=m.TdvmcallMapGpa(gpa=0, size=4096))
    assert mapped.status == "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED"
    await call("tdx", "guest_complete_hypercall", td, 0, body=m.HypercallComplete(), status=400)
    vmcall = await call("guest", "guest_hypercall", vm, 0, body=m.Hypercall(nr=12, a0=0, a1=1))
    assert vmcall.rax == (1 << 64) - 1000  # -KVM_ENOSYS: KVM_CAP_EXIT_HYPERCALL is off
    rec = await call("zaps", "nx_huge_pages_recover", vm, body=m.NxRecoverRequest())
    assert rec.recovered == 0

    # Tokens (the open service acts as the admin).
    tok = await call("tokens", "tokens_create", body=m.TokenCreate(tenant="sdk"), status=201)
    assert tok.token.startswith("vkmmu_")
    assert [t.id for t in (await call("tokens", "tokens_list")).items] == [tok.id]
    assert (await call("tokens", "tokens_get", tok.id)).tenant == "sdk"
    assert (await call("tokens", "tokens_revoke", tok.id)).revoked_at is not None
    await call("metrics", "metrics_get")

    # Errors come back as typed problems.
    bad = m.MemoryRegion(guest_phys_addr=0, memory_size=4097, userspace_addr=hva)
    prob = await call("memslots", "memslots_set", vm, 1, body=bad, status=400)
    assert prob.errno_name == "EINVAL"
    prob = await call("vms", "vms_get", "vm-nope", status=404)
    assert prob.status == 404
    await call("vms", "vms_delete", vm)

    ops = {p.stem for p in (BUILD / PACKAGE / "api").glob("*/*.py") if p.stem != "__init__"}
    assert ops - used == set()
