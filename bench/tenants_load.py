"""Three tenants under load on one real server (prints figures, asserts nothing about time).

Starts `vkmmu serve` on loopback (a real uvicorn process, a temporary SQLite file, an admin
token), issues one token per worker (three tenants, `--workers` each), gives each worker a
VM with a 64 MiB memslot, then for `--seconds` runs a mix per worker:
reads (the VM, the VM list, stats; 50%), memslot churn (create and delete slot 1; 25%),
guest faults (write accesses of 64 KiB on slot 0; 20%), and probes of another tenant's VM
(5%, which must answer 404).

Counted as errors: any answer other than the one expected (a 5xx, a 4xx other than the
probes' 404, a 429). Counted as cross-tenant answers: any answer body naming a VM of another
tenant (listing, stats, faults, the probes' 404 bodies included). Both must be zero; the
script exits 1 otherwise. Throughput and latency percentiles are printed and written to
bench/tenants_load.json.

Usage: python bench/tenants_load.py [--seconds S] [--workers N] [--token-rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "tenants_load.json"
ADMIN = "bench-admin-token"
TENANTS = ("red", "green", "blue")
HVA = 0x7F00_0000_0000
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db: Path, port: int, token_rate: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VKMMU_ADMIN_TOKEN": ADMIN,
        "VKMMU_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "VKMMU_LOG_LEVEL": "WARNING",
        "VKMMU_TOKEN_RATE_PER_S": str(token_rate),
        "VKMMU_GC_INTERVAL_S": "0",
    }
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


async def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=base) as c:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the server did not become ready")


class Tally:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.cross: list[str] = []

    def add(self, kind: str, seconds: float) -> None:
        self.latency.setdefault(kind, []).append(seconds)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0


async def worker(
    base: str,
    token: str,
    tenant: str,
    vm: str,
    foreign: dict[str, list[str]],
    deadline: float,
    tally: Tally,
    seed: int,
) -> None:
    others = [v for t, vms in foreign.items() if t != tenant for v in vms]
    rnd = random.Random(seed)
    head = {"Authorization": f"Bearer {token}"}
    slot1 = {"guest_phys_addr": 1 << 30, "memory_size": 2 * MIB, "userspace_addr": HVA + (1 << 30)}
    slot_up = False
    async with httpx.AsyncClient(base_url=base, headers=head, timeout=60) as c:
        while time.monotonic() < deadline:
            roll = rnd.random()
            expect = 200
            if roll < 0.5:
                kind = "read"
                path = rnd.choice((f"/v1/vms/{vm}", "/v1/vms", f"/v1/vms/{vm}/stats"))
                req = c.get(path)
            elif roll < 0.75:
                kind = "memslot"
                if slot_up:
                    req = c.delete(f"/v1/vms/{vm}/memslots/1")
                else:
                    req = c.put(f"/v1/vms/{vm}/memslots/1", json=slot1)
                slot_up = not slot_up
            elif roll < 0.95:
                kind = "fault"
                gpa = rnd.randrange(0, 64 * MIB, 64 * 1024)
                body = {"gpa": gpa, "size": 64 * 1024, "access": "write"}
                req = c.post(f"/v1/vms/{vm}/vcpus/0/accesses", json=body)
            else:
                kind, expect = "probe", 404
                target = rnd.choice(others)
                req = c.get(f"/v1/vms/{target}")
            t0 = time.perf_counter()
            r = await req
            tally.add(kind, time.perf_counter() - t0)
            if r.status_code != expect:
                tally.errors.append(f"{tenant} {kind} {r.request.url.path} -> {r.status_code}")
            leaked = [v for v in others if v in r.text and v not in str(r.request.url)]
            if leaked:
                tally.cross.append(f"{tenant} {kind} {r.request.url.path} named {leaked}")


async def run(seconds: float, workers: int, token_rate: float) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vkmmu-tenants-load-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(tmp / "load.db", port, token_rate)
    try:
        await wait_ready(base, proc)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        setup: list[tuple[str, str, str]] = []  # (tenant, token, vm)
        async with httpx.AsyncClient(base_url=base, headers=admin, timeout=60) as c:
            for tenant in TENANTS:
                for _ in range(workers):
                    r = await c.post("/v1/tokens", json={"tenant": tenant})
                    r.raise_for_status()
                    token = r.json()["token"]
                    head = {"Authorization": f"Bearer {token}"}
                    r = await c.post("/v1/vms", json={"name": tenant}, headers=head)
                    r.raise_for_status()
                    vm = r.json()["id"]
                    slot0 = {"guest_phys_addr": 0, "memory_size": 64 * MIB, "userspace_addr": HVA}
                    r = await c.put(f"/v1/vms/{vm}/memslots/0", json=slot0, headers=head)
                    r.raise_for_status()
                    setup.append((tenant, token, vm))
        foreign: dict[str, list[str]] = {t: [v for tt, _, v in setup if tt == t] for t in TENANTS}
        tally = Tally()
        t0 = time.monotonic()
        deadline = t0 + seconds
        await asyncio.gather(
            *(
                worker(base, token, tenant, vm, foreign, deadline, tally, seed)
                for seed, (tenant, token, vm) in enumerate(setup)
            )
        )
        took = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    every = [x for xs in tally.latency.values() for x in xs]
    figures: dict[str, Any] = {
        "seconds": round(took, 2),
        "tenants": len(TENANTS),
        "workers": len(setup),
        "requests": len(every),
        "throughput_rps": round(len(every) / took, 1),
        "p50_ms": round(pct(every, 0.5) * 1e3, 2),
        "p99_ms": round(pct(every, 0.99) * 1e3, 2),
        "errors": len(tally.errors),
        "cross_tenant_answers": len(tally.cross),
        "by_kind": {
            k: {
                "requests": len(xs),
                "p50_ms": round(pct(xs, 0.5) * 1e3, 2),
                "p99_ms": round(pct(xs, 0.99) * 1e3, 2),
            }
            for k, xs in sorted(tally.latency.items())
        },
        "token_rate_per_s": token_rate,
        "cpus": os.cpu_count(),
    }
    print(f"{len(TENANTS)} tenants x {workers} workers, {took:.1f} s, SQLite, one uvicorn process")
    print(
        f"requests {figures['requests']:,}  throughput {figures['throughput_rps']:,.1f}/s  "
        f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms"
    )
    for k, f in figures["by_kind"].items():
        print(f"  {k:<8} n={f['requests']:<6} p50={f['p50_ms']:8.2f} ms  p99={f['p99_ms']:8.2f} ms")
    print(f"errors {len(tally.errors)}  cross-tenant answers {len(tally.cross)}")
    for line in (tally.errors + tally.cross)[:10]:
        print("  ", line)
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {OUT.relative_to(REPO)}")
    return 1 if tally.errors or tally.cross else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="how long the mix runs")
    ap.add_argument("--workers", type=int, default=3, help="workers (tokens, VMs) per tenant")
    ap.add_argument(
        "--token-rate",
        type=float,
        default=1000.0,
        help="VKMMU_TOKEN_RATE_PER_S for the server (above what one worker makes: a 429 "
        "would count as an error)",
    )
    args = ap.parse_args()
    return asyncio.run(run(args.seconds, args.workers, args.token_rate))


if __name__ == "__main__":
    sys.exit(main())
