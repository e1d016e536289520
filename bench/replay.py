"""Trace replay speed: a 10,000-line QEMU trace through the VM service (journaled).

Prints the time of `POST …/replay`'s service path (`app.services.replay.replay`, batches of
500 calls per transaction) on SQLite, or on the database given with --database-url. Checks
that every line was applied and matched its `ret`; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.services import qemu_trace, replay  # noqa: E402
from app.services.vms import build_service  # noqa: E402

HVA = 0x7F2A00000000
MiB = 1 << 20


def make_trace(lines: int) -> str:
    """RAM in both address spaces, then a VGA window toggled until `lines` calls."""
    out = [
        f"kvm_set_user_memory AddrSpace#{a} Slot#0 flags=0x0 gpa=0x0 size=0xa0000 "
        f"ua=0x{HVA:x} guest_memfd=-1 guest_memfd_offset=0x0 ret=0"
        for a in (0, 1)
    ]
    out += [
        f"kvm_set_user_memory AddrSpace#{a} Slot#1 flags=0x0 gpa=0x100000 size=0x{64 * MiB:x} "
        f"ua=0x{HVA + 0x100000:x} guest_memfd=-1 guest_memfd_offset=0x0 ret=0"
        for a in (0, 1)
    ]
    i = 0
    while len(out) < lines:
        size = 0x20000 if i % 2 == 0 else 0
        out.append(
            f"kvm_set_user_memory Slot#2 flags=0x0 gpa=0xa0000 size=0x{size:x} "
            f"ua=0x7f1000000000 ret=0"
        )
        i += 1
    return "\n".join(out) + "\n"


async def run(url: str, lines: int, touch: str) -> None:
    service = build_service(url, snapshot_every=1000)
    await service.start()
    try:
        info, _ = await service.create_vm(name="bench")
        trace = qemu_trace.parse(make_trace(lines))
        t0 = time.perf_counter()
        answer, _ = await replay.replay(service, info["id"], trace, replay.Touch(touch))
        elapsed = time.perf_counter() - t0
        assert answer["applied"] == lines and answer["mismatches"] == 0, answer["mismatches"]
        await service.wait_background()
        t = answer["touch"]
        print(
            f"{lines:,} lines, touch={touch}: {elapsed:.2f} s "
            f"({lines / elapsed:,.0f} lines/s; {t['accesses']:,} guest accesses, "
            f"{t['refaults']:,} refaults)",
            flush=True,
        )
    finally:
        await service.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = p.parse_args()
    for touch in ("none", "all_ram"):
        lines = args.lines if touch == "none" else min(args.lines, 2000)
        with tempfile.TemporaryDirectory() as d:
            url = args.database_url or f"sqlite+aiosqlite:///{d}/bench.db"
            asyncio.run(run(url, lines, touch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
