"""`make bench`: every figure of the performance targets (issue 12), each with its reference,
from one run; writes bench/results.json.

Runs, one process each (the HTTP figures against a real `vkmmu serve` on loopback):
- bench/service_http.py --quick: faults and zaps over HTTP vs a numpy floor timed in the
  same run, memslot PUTs with 32,763 slots present, their creation with the batch call, and
  another VM's calls during one long access (the published bound);
- bench/replay_speed.py: journal replay records/s and the first answer after a restart;
- bench/engine.py's memory child: resident bytes per mapped 4 KiB SPTE at 16M SPTEs;
- bench/engine.py --huge-json: the 16 GiB faults at 4 KiB and behind 2 MiB host pages in-process
  (a reference for the HTTP row: the same ratio without any per-call cost).
`--all` then runs the other scripts too (bench/README.md). Nothing fails on time: a figure
that misses its target is printed and recorded as such; a script that fails (an exception,
not a slow run) makes this exit non-zero.

Usage: python bench/run.py [--all] [--long-gib N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OTHERS = (  # `--all`, in this order; absent ones are skipped
    "engine.py",
    "persistence.py",
    "isolation.py",
    "replay.py",
    "mappings.py",
    "snapshot_memory.py",
    "trace.py",
    "tenants_load.py",
    "call_cost.py",
)
MEMORY_SPTES = 16 << 20
MS = 1e-3
# The published bound on another VM's calls during one long access (README, "Long calls and
# other VMs"): measured on an idle 2-vCPU machine with a 1 TiB access at 4 KiB.
LONG_P99_MS = 20
LONG_MAX_MS = 100


def _run(args: list[str], out: Path | None = None) -> dict[str, Any] | None:
    """Run a bench script; its JSON figures (from `out`, or its last stdout line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(
        f"\n######## {' '.join(Path(a).name if a.endswith('.py') else a for a in args)}", flush=True
    )
    t0 = time.perf_counter()
    if out is None:
        proc = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True
        )
        sys.stdout.write(proc.stderr[-2000:] if proc.returncode else "")
    else:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True)
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if proc.returncode:
        print(f"== {args[0]} exited with {proc.returncode}", flush=True)
        return None
    if out is not None:
        return dict(json.loads(out.read_text()))
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _fig(
    name: str,
    value: float | None,
    unit: str,
    target: str,
    met: bool | None,
    reference: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "figure": name,
        "value": value,
        "unit": unit,
        "target": target,
        "met": met,
        "reference": reference,
        **extra,
    }


def figures(
    http: dict[str, Any] | None,
    rp: dict[str, Any] | None,
    mem: dict[str, Any] | None,
    huge: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    f = (http or {}).get("faults")
    if f:
        floor = "numpy writing the same leaf entries into arrays of 512, timed in this run"
        for key, floor_key, bound, what in (
            ("4g", "floor_4g", 3.0, "4 GiB at 4 KiB"),
            ("16g", "floor_16g", 2.0, "16 GiB at 4 KiB"),
        ):
            for op in ("fault", "zap"):
                ratio = f[f"{op}_{key}"] / f[floor_key]
                out.append(
                    _fig(
                        f"HTTP {op} {what} / numpy floor",
                        round(ratio, 2),
                        "x",
                        f"<= {bound:g}x",
                        ratio <= bound,
                        floor,
                        seconds=round(f[f"{op}_{key}"], 4),
                        floor_seconds=round(f[floor_key], 4),
                    )
                )
        speedup = f["fault_16g"] / f["fault_16g_2m"]
        out.append(
            _fig(
                "HTTP fault 16 GiB: 2 MiB host pages vs 4 KiB, per GiB",
                round(speedup, 1),
                "x faster",
                ">= 10x faster",
                speedup >= 10,
                "the 4 KiB fault of the same run; an access that maps nothing takes "
                f"{f['idle_access'] * 1e3:.2f} ms over HTTP (bounds this ratio at "
                f"{f['fault_16g'] / f['idle_access']:.1f}x)",
                seconds_2m=round(f["fault_16g_2m"], 4),
                seconds_4k=round(f["fault_16g"], 4),
                zap_2m_seconds=round(f["zap_16g_2m"], 4),
            )
        )
        out.append(
            _fig(
                "first 4 GiB fault of a fresh server",
                round(f["first_fault_4g"], 4),
                "s",
                "no first-call penalty",
                None,
                "the best of the later runs",
                best_seconds=round(f["fault_4g"], 4),
            )
        )
    if huge:
        engine = huge["fault_16g_4k_s"] / huge["fault_16g_2m_s"]
        out.append(
            _fig(
                "engine alone, in-process: 16 GiB fault, 2 MiB vs 4 KiB host pages",
                round(engine, 1),
                "x faster",
                "- (the HTTP 2 MiB row without its per-call cost)",
                None,
                f"best of {huge['repeat']}, in-process",
                seconds_2m=round(huge["fault_16g_2m_s"], 5),
                seconds_4k=round(huge["fault_16g_4k_s"], 4),
            )
        )
    m = (http or {}).get("memslots")
    if m:
        ref = "32,763 slots present (memslot_perf_test), automatic snapshots on"
        out.append(
            _fig("memslot PUT p50", round(m["put_p50_s"] / MS, 3), "ms", "< 1.5 ms",
                 m["put_p50_s"] < 1.5 * MS, ref, puts=m["puts"], snapshots=m["snapshots"])
        )  # fmt: skip
        out.append(
            _fig("memslot PUT p99", round(m["put_p99_s"] / MS, 3), "ms", "< 5 ms",
                 m["put_p99_s"] < 5 * MS, ref, max_ms=round(m["put_max_s"] / MS, 1))
        )  # fmt: skip
        out.append(
            _fig(
                "32,763 slots created over HTTP with the batch call",
                round(m["batch_create_s"], 2),
                "s",
                "< 3 s",
                m["batch_create_s"] < 3,
                "the kernel: 0.59 s (memslot_perf_test); one PUT at a time: 85-100 s",
                batch_calls=m["batch_calls"],
            )
        )
    if rp:
        out.append(
            _fig(
                "journal replay",
                round(rp["records_per_s"]),
                "records/s",
                ">= 50,000 records/s",
                rp["records_per_s"] >= 50_000,
                f"{rp['records']:,} records of QEMU's memslot traffic, no snapshot; "
                "before: ~114 us per record",
                engine_only_records_per_s=round(rp.get("engine_records_per_s", 0)),
            )
        )
        out.append(
            _fig(
                "first answer after a restart (10,000 records, no snapshot)",
                round(rp["first_answer_s"], 3),
                "s",
                "< 0.3 s",
                rp["first_answer_s"] < 0.3,
                "before: 1.2 s",
            )
        )
    if mem:
        per = mem["rss_delta"] / mem["sptes"]
        out.append(
            _fig(
                f"resident bytes per mapped 4 KiB SPTE at {mem['sptes']:,} SPTEs",
                round(per, 2),
                "bytes",
                "<= 9",
                per <= 9,
                "hardware: 8; before: 8.17",
            )
        )
    lc = (http or {}).get("long_call")
    if lc:
        out.append(
            _fig(
                f"another VM's memslot PUT during one {lc['long_gib']} GiB access: p99",
                round(lc["busy_p99_s"] / MS, 2),
                "ms",
                f"<= {LONG_P99_MS} ms, none over {LONG_MAX_MS} ms (the README's bound)",
                lc["busy_p99_s"] <= LONG_P99_MS * MS and lc["busy_max_s"] <= LONG_MAX_MS * MS,
                f"the same calls with the service idle: p99 {lc['idle_p99_s'] / MS:.2f} ms",
                p50_ms=round(lc["busy_p50_s"] / MS, 2),
                max_ms=round(lc["busy_max_s"] / MS, 2),
                calls=lc["busy_calls"],
                long_call_s=round(lc["long_call_s"], 2),
            )
        )
    return out


def _show(figs: list[dict[str, Any]]) -> None:
    print("\n======== issue 12 targets (ratios from this run)")
    for g in figs:
        mark = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        print(
            f"{g['figure']:<66} {g['value']!s:>10} {g['unit']:<10} target {g['target']:<22} {mark}"
        )
        print(f"{'':<8}reference: {g['reference']}")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--all", action="store_true", help="then run every other bench script")
    ap.add_argument(
        "--long-gib", type=int, default=1024, help="the long access (GiB at 4 KiB; at most 1024)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_before = _load()
    status = 0
    with tempfile.TemporaryDirectory(prefix="vkmmu-bench-") as tmp:
        http_out, rp_out = Path(tmp) / "http.json", Path(tmp) / "replay.json"
        http = _run(
            [str(HERE / "service_http.py"), "--quick", "--long-gib", str(args.long_gib),
             "--json", str(http_out)], http_out,
        )  # fmt: skip
        rp = _run([str(HERE / "replay_speed.py"), "--json", str(rp_out)], rp_out)
        mem = _run([str(HERE / "engine.py"), "--memory-child", str(MEMORY_SPTES)])
        huge = _run([str(HERE / "engine.py"), "--huge-json"])
    ran = {"service_http": http, "replay_speed": rp, "engine memory": mem, "engine 2 MiB": huge}
    for name, got in ran.items():
        if got is None:
            status = 1
            print(f"== {name}: no figures", flush=True)
    figs = figures(http, rp, mem, huge)
    _show(figs)
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": figs,
        "raw": {"service_http": http, "replay_speed": rp, "engine_memory": mem, "engine_2m": huge},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} "
        f"({result['seconds']:.0f} s; load average {load_before} before, {_load()} after)",
        flush=True,
    )
    if args.all:
        for name in OTHERS:
            script = HERE / name
            if not script.exists():
                continue
            print(f"\n######## bench/{name}", flush=True)
            rc = subprocess.run([sys.executable, str(script)], cwd=REPO, check=False).returncode
            if rc:
                print(f"== bench/{name} exited with {rc}", flush=True)
                status = rc
    return status


if __name__ == "__main__":
    sys.exit(main())
