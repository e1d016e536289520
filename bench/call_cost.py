"""What one API call costs the service, in-process (prints figures, asserts nothing).

The app is driven through ASGI in this process (no sockets, no client): an access that maps
nothing, a `GET /v1/vms/{vm}` and `GET /healthz`, each `--calls` times after a warm-up,
then the service's `mutate` alone for the same access (what the HTTP layer adds is the
difference). CPU time per call is printed; on a shared machine it moves by half between
runs, so `--callgrind` also counts instructions per call, which do not move: each kind runs
twice under valgrind's callgrind (0 calls and `--calls`), and the difference of the totals
is divided by `--calls`. valgrind must be installed for that (`apt-get install valgrind`).

Usage: python bench/call_cost.py [--calls N] [--callgrind] [--kind access,getvm,healthz,service]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
KINDS = ("access", "getvm", "healthz", "service")
GIB = 1 << 30
HVA = 0x7F00_0000_0000


async def _run(kind: str, calls: int) -> float:
    """CPU seconds per call of `kind`, after a VM with 16 GiB mapped at 2 MiB is set up."""
    from app.config import Settings
    from app.engine import ops
    from app.main import create_app

    app = create_app(Settings())

    async def call(method: str, path: str, body: Any = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"bench"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        messages: list[dict[str, Any]] = []
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError

        async def send(m: dict[str, Any]) -> None:
            messages.append(m)

        await app(scope, receive, send)
        if messages[0]["status"] >= 300:
            raise SystemExit(f"{method} {path}: {messages[0]['status']} {messages[1:]}")
        return json.loads(b"".join(m.get("body", b"") for m in messages[1:]) or b"null")

    async with app.router.lifespan_context(app):
        vm = (await call("POST", "/v1/vms", {"name": "cost", "vm_type": 0}))["id"]
        region = {"guest_phys_addr": 0, "memory_size": 16 * GIB, "userspace_addr": HVA}
        await call("PUT", f"/v1/vms/{vm}/memslots/0", region)
        huge = {"userspace_addr": HVA, "len": 16 * GIB, "page_size": 2 << 20}
        await call("POST", f"/v1/vms/{vm}/host-memory/map", huge)
        await call("POST", f"/v1/vms/{vm}/vcpus/0/accesses", {"gpa": 0, "size": 16 * GIB})
        noop = {"gpa": 0, "size": 4096, "access": "read"}
        service = app.state.service

        async def one() -> None:
            if kind == "access":
                await call("POST", f"/v1/vms/{vm}/vcpus/0/accesses", noop)
            elif kind == "getvm":
                await call("GET", f"/v1/vms/{vm}")
            elif kind == "healthz":
                await call("GET", "/healthz")
            else:
                await service.mutate(vm, ops.Access.from_json({"vcpu": 0, **noop}))

        for _ in range(50):
            await one()
        t0 = time.process_time()
        for _ in range(calls):
            await one()
        return (time.process_time() - t0) / max(1, calls)


def _instructions(kind: str, calls: int) -> int:
    """callgrind's total for this script doing `calls` calls of `kind`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "--child",
                kind,
                "--calls",
                str(calls),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"Collected : ([\d,]+)", out.stderr)
    if found is None:
        raise SystemExit(f"no callgrind total in:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--callgrind", action="store_true", help="count instructions too")
    ap.add_argument("--kind", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vkmmu-cost-") as tmp:
        os.environ.update(
            VKMMU_DATABASE_URL=f"sqlite+aiosqlite:///{tmp}/cost.db",
            VKMMU_LOG_LEVEL="WARNING",
            VKMMU_GC_INTERVAL_S="0",
            VKMMU_SNAPSHOT_EVERY="1000000",  # the call alone, no snapshot among them
        )
        if args.child:
            uvloop.run(_run(args.child, args.calls))
            return
        for kind in args.kind.split(","):
            if kind not in KINDS:
                raise SystemExit(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
            cpu = uvloop.run(_run(kind, args.calls))
            line = f"{kind:>8}: {cpu * 1e3:.3f} ms CPU per call"
            if args.callgrind:
                n = max(100, args.calls // 5)  # callgrind runs ~50x slower
                per = (_instructions(kind, n) - _instructions(kind, 0)) / n
                line += f", {per / 1e6:.2f} M instructions per call (callgrind, {n} calls)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
