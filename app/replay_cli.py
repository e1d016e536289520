"""`vkmmu replay FILE` (against a running service) and `vkmmu compare TRACE` (in process)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
# A chunk of whole lines per request; halved when the service answers 413.
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
TD = 5  # KVM_X86_TDX_VM
KVM_MEM_READONLY = 1 << 1


def add_commands(sub: Any) -> None:
    r = sub.add_parser("replay", help="replay a QEMU kvm_set_user_memory trace onto a VM")
    r.add_argument("file", type=Path, help="the trace (QEMU -trace kvm_set_user_memory output)")
    r.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    r.add_argument("--vm", default=None, help="the VM id (default: a new VM)")
    r.add_argument("--touch", default="none", help="none | all_ram | after_each | gpa+size,…")
    r.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    r.add_argument("--format", choices=("table", "json"), default="table")
    r.add_argument("--token", default=None, help="bearer token (default: VKMMU_ADMIN_TOKEN if set)")
    r.set_defaults(func=replay_command)
    c = sub.add_parser(
        "compare", help="what zap-all costs a trace: quirk on, quirk off, a TD (in process)"
    )
    c.add_argument("trace", type=Path)
    c.add_argument("--touch", default="all_ram", help="none | all_ram | after_each")
    c.add_argument("--format", choices=("table", "json", "md"), default="table")
    c.add_argument("--cost", action="append", default=[], metavar="NAME=NS", help="a cost (ns)")
    c.set_defaults(func=compare_command)


# ------------------------------------------------------------------ replay


def chunks(path: Path, limit: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) of consecutive whole-line chunks of at most `limit` bytes
    (a single longer line is its own chunk: the service reports it)."""
    buf: list[bytes] = []
    size = 0
    first = 1
    n = 0
    with path.open("rb") as f:
        for line in f:
            n += 1
            if buf and size + len(line) > limit:
                yield first, b"".join(buf)
                buf, size, first = [], 0, n
            buf.append(line)
            size += len(line)
    if buf:
        yield first, b"".join(buf)


def _merge(total: dict[str, Any], part: dict[str, Any]) -> None:
    if not total:
        total.update(part)
        return
    for key in ("results", "errors"):
        total[key].extend(part[key])
    for key in ("ignored", "lines", "applied", "mismatches"):
        total[key] += part[key]
    total["mismatched_lines"] = (total["mismatched_lines"] + part["mismatched_lines"])[:100]
    for key in ("accesses", "pages_mapped", "refaults", "errors"):
        total["touch"][key] += part["touch"][key]
    total["touch"]["first_error"] = total["touch"]["first_error"] or part["touch"]["first_error"]


def replay_command(settings: Settings, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    if not args.file.is_file():
        print(f"vkmmu replay: no such file: {args.file}", file=sys.stderr)
        return 2
    total_bytes = args.file.stat().st_size
    answer: dict[str, Any] = {}
    token = args.token
    if token is None and settings.admin_token is not None:
        token = settings.admin_token.get_secret_value() or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=args.url, timeout=600, headers=headers) as client:
        try:
            vm = args.vm or _create_vm(client, args.file.name)
            limit = max(MIN_CHUNK_BYTES, args.chunk_bytes)
            with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
                task = bar.add_task(f"replaying {args.file.name}", total=total_bytes)
                pending = list(chunks(args.file, limit))
                while pending:
                    first, body = pending.pop(0)
                    r = client.post(
                        f"/v1/vms/{vm}/replay",
                        params={"touch": args.touch, "first_line": first},
                        content=body,
                        headers={"Content-Type": "text/plain"},
                    )
                    if r.status_code == 413 and len(body) > MIN_CHUNK_BYTES:
                        # The service takes less per request: split this chunk in two.
                        half = _split(first, body)
                        pending[:0] = half
                        continue
                    if r.status_code != 200:
                        print(f"vkmmu replay: {_problem(r)}", file=sys.stderr)
                        return 1
                    _merge(answer, r.json())
                    bar.advance(task, len(body))
        except httpx.HTTPError as e:
            print(f"vkmmu replay: {args.url}: {e}", file=sys.stderr)
            return 1
    answer["vm"] = vm
    if args.format == "json":
        print(json.dumps(answer, indent=2))
    else:
        print(_replay_summary(answer))
    return 0


def _split(first: int, body: bytes) -> list[tuple[int, bytes]]:
    lines = body.splitlines(keepends=True)
    if len(lines) < 2:
        return [(first, body)]
    mid = len(lines) // 2
    return [(first, b"".join(lines[:mid])), (first + mid, b"".join(lines[mid:]))]


def _create_vm(client: httpx.Client, name: str) -> str:
    r = client.post("/v1/vms", json={"name": f"replay {name}"[:60]})
    if r.status_code != 201:
        raise httpx.HTTPError(_problem(r))
    return str(r.json()["id"])


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
        return f"{r.status_code} {body.get('title', '')}: {body.get('detail', '')}"
    except ValueError:
        return f"{r.status_code} {r.text[:200]}"


def _replay_summary(a: dict[str, Any]) -> str:
    out = [
        f"VM {a['vm']}: {a['lines']} lines, {a['applied']} calls applied, "
        f"{a['ignored']} ignored, {len(a['errors'])} not replayed, "
        f"{a['mismatches']} answered otherwise than the trace",
    ]
    for r in [r for r in a["results"] if not r["matches_trace"]][:20]:
        got = "ok" if r["ok"] else f"{r['errno_name']} ({r['detail']})"
        out.append(f"  line {r['line']}: slot {r['slot']:#x} traced ret={r['ret']}, here {got}")
    for e in a["errors"][:20]:
        out.append(f"  line {e['line']}: not replayed: {e['message']}")
    zaps: dict[str, int] = {}
    for r in a["results"]:
        if r["zap"]:
            zaps[r["zap"]["path"]] = zaps.get(r["zap"]["path"], 0) + 1
    if zaps:
        out.append("zaps: " + ", ".join(f"{k} {v}" for k, v in sorted(zaps.items())))
    t = a["touch"]
    if t["mode"] != "none":
        out.append(
            f"guest touches: {t['accesses']} accesses, {t['pages_mapped']} pages mapped, "
            f"{t['refaults']} refaults"
        )
    return "\n".join(out)


# ------------------------------------------------------------------ compare

ROWS: tuple[tuple[str, str], ...] = (
    ("VM type", "vm_type_name"),
    ("SLOT_ZAP_ALL in force", "slot_zap_all"),
    ("trace calls answered otherwise", "trace_mismatches"),
    ("zaps", "zaps"),
    ("zap paths", "zaps_by_path"),
    ("leaf SPTEs zapped", "sptes_zapped_total"),
    ("page tables freed", "tables_freed"),
    ("roots invalidated", "roots_invalidated"),
    ("TLB flushes", "tlb_flushes"),
    ("vCPU kicks", "vcpu_kicks"),
    ("EPT violations (faults)", "faults"),
    ("refaults", "refaults"),
    ("S-EPT operations", "sept_operations_total"),
    ("audit violations", "audit_violations"),
    ("model run time (ms)", "model_wall_ms"),
)


def default_variants(trace: Any) -> list[Any]:
    from app.services.whatif import Variant

    out = [Variant("quirk on", 0), Variant("quirk off", 128)]
    # A TD has one address space and no read-only memslots: only a trace without them fits.
    if all(c.as_id == 0 and not c.flags & KVM_MEM_READONLY for c in trace.calls):
        out.append(Variant("TD", None, TD))
    return out


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def compare_rows(answer: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    names = [v["name"] for v in answer["variants"]]
    counts = [[label, *(_cell(v[key]) for v in answer["variants"])] for label, key in ROWS]
    est = [
        [
            "estimated guest time (µs)",
            *(_cell(v["estimate"]["total_us"]) for v in answer["variants"]),
        ],
        [
            "counted but not estimated",
            *(", ".join(v["estimate"]["not_estimated"]) or "-" for v in answer["variants"]),
        ],
    ]
    return names, counts, est


def render_md(answer: dict[str, Any], title: str) -> str:
    names, counts, est = compare_rows(answer)
    head = f"| {title} | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    lines = [head + "\n".join("| " + " | ".join(r) + " |" for r in counts)]
    lines.append(
        "\nEstimate (a model, not a measurement; costs and sources in docs/cost-model.md):\n"
    )
    lines.append(
        "| | "
        + " | ".join(names)
        + " |\n|---|"
        + "---:|" * len(names)
        + "\n"
        + "\n".join("| " + " | ".join(r) + " |" for r in est)
    )
    return "\n".join(lines)


def render_table(answer: dict[str, Any], title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    names, counts, est = compare_rows(answer)
    console = Console(width=120, record=True, file=io.StringIO())
    t = Table(title=f"{title}: counts")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for r in counts:
        t.add_row(*r)
    e = Table(title="estimate: a model, not a measurement (docs/cost-model.md)")
    e.add_column("")
    for n in names:
        e.add_column(n, justify="right")
    for r in est:
        e.add_row(*r)
    console.print(t)
    console.print(e)
    return console.export_text()


def _costs(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name.strip()] = float(value)
    return out


async def run_compare(
    trace_text: str, touch: str, costs: dict[str, float], progress: Any = None
) -> dict[str, Any]:
    """Replay the trace from an empty VM once per default variant (in-memory forks of a VM
    in a throwaway SQLite database)."""
    from app.services import qemu_trace, replay, whatif
    from app.services.vms import build_service

    trace = qemu_trace.parse(trace_text)
    with tempfile.TemporaryDirectory(prefix="vkmmu-compare-") as d:
        service = build_service(f"sqlite+aiosqlite:///{d}/compare.db", snapshot_every=1 << 30)
        await service.start()
        try:
            info, _ = await service.create_vm(name="compare")
            answer = await whatif.what_if(
                service,
                info["id"],
                variants=default_variants(trace),
                trace=trace,
                touch=replay.Touch.parse(touch),
                costs=costs,
                max_variants=8,
                max_ops=len(trace.calls) + 1,
                progress=progress,
            )
        finally:
            await service.stop()
    answer["trace_lines"] = trace.lines
    answer["trace_errors"] = [{"line": e.line, "message": e.message} for e in trace.errors]
    return answer


def compare_command(settings: Settings, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from app.services import cost_model, replay

    if not args.trace.is_file():
        print(f"vkmmu compare: no such file: {args.trace}", file=sys.stderr)
        return 2
    try:
        costs = _costs(args.cost)
        cost_model.resolve(costs)
        replay.Touch.parse(args.touch)
    except (ValueError, cost_model.CostError, replay.OpError) as e:
        print(f"vkmmu compare: {e}", file=sys.stderr)
        return 2
    text = args.trace.read_text(errors="replace")
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"comparing {args.trace.name}", total=None)

        async def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        answer = asyncio.run(run_compare(text, args.touch, costs, progress))
    if args.format == "json":
        print(json.dumps(answer, indent=2))
        return 0
    title = args.trace.name
    print(render_md(answer, title) if args.format == "md" else render_table(answer, title))
    for bad in answer["trace_errors"][:20]:
        print(f"line {bad['line']}: not replayed: {bad['message']}")
    return 0
