"""Peak memory of a snapshot (`codec.dumps`) and of decoding one (`codec.loads`), against
the VM's state (prints figures, asserts nothing about memory).

Two VMs: one whose state is page tables (a 64 GiB slot faulted in at 4 KiB: 32,834 tables,
128 MiB) and one whose state is written host pages (128 MiB of random bytes, which do not
compress). Each figure is measured in a fresh child process: the peak RSS
(`ru_maxrss`) during the call minus the RSS just before it (the VM, or the snapshot bytes,
already in memory), divided by the VM's state (`budget.bytes_held`).

Usage: python bench/snapshot_memory.py [--mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from app.engine import Vm, codec
from app.engine.ops import parse
from app.services import budget

HVA = 0x7F00_0000_0000
MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm(kind: str, mib: int) -> Vm:
    vm = Vm.create(0, 1, table_budget=1 << 22)
    size = mib * MIB * (512 if kind == "tables" else 1)
    region = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": size}
    vm.apply(parse("set_user_memory_region", {**region, "userspace_addr": HVA}))
    if kind == "tables":
        vm.apply(parse("access", {"vcpu": 0, "gpa": 0, "size": size, "access": "write"}))
    else:
        for i in range(mib):
            data = os.urandom(MIB).hex()
            vm.apply(parse("host_write", {"userspace_addr": HVA + i * MIB, "data": data}))
    return vm


def _child(kind: str, mib: int, what: str, path: Path) -> None:
    """One measurement (in its own process): prints a JSON line."""
    if what == "dumps":
        vm = _vm(kind, mib)
        state = budget.bytes_held(vm)
        base, before = _rss(), _peak()
        data = codec.dumps(vm)
        path.write_bytes(data)
    else:
        data = path.read_bytes()
        base, before = _rss(), _peak()
        vm = codec.loads(data)
        state = budget.bytes_held(vm)
    grew = _peak() - max(base, before)
    print(json.dumps({"state": state, "snapshot": len(data), "peak_over_base": max(0, grew)}))


def main(mib: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        for kind in ("tables", "contents"):
            path = Path(d) / f"{kind}.snap"
            for what in ("dumps", "loads"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    what,
                    str(path),
                    "--mib",
                    str(mib),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                grew = r["peak_over_base"]
                print(
                    f"{kind:<9} {what:<6} state {r['state'] / MIB:8.1f} MiB  snapshot "
                    f"{r['snapshot'] / MIB:8.1f} MiB  peak over the state in memory "
                    f"{grew / MIB:8.1f} MiB = {grew / r['state']:.2f}x"
                )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=128, help="state size of each VM (MiB)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "WHAT", "PATH"))
    ns = ap.parse_args()
    if ns.child:
        _child(ns.child[0], ns.mib, ns.child[1], Path(ns.child[2]))
    else:
        main(ns.mib)
