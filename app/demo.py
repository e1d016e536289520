"""`vkmmu demo`: the README's tour (docs/tour.sh), run against an in-process app on a
throw-away SQLite database and shown as tables.

The calls are the tour's, in the same order (a test compares the two): two memslots, the
guest faults them in, slot 1 is deleted with KVM_X86_QUIRK_SLOT_ZAP_ALL in force (every
SPTE of the VM zapped, slot 0 refaults), the quirk is disabled, and the same delete zaps only
slot 1's SPTEs (slot 0 stays mapped).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

MiB = 1 << 20
# Fields worth a look in each kind of answer (the rest is one `curl` away).
ZAP_FIELDS = ("path", "slot", "slot_zap_all", "sptes_zapped_total", "roots_invalidated")
ZAP_FIELDS_MORE = ("tables_freed", "tlb_flushes")
STAT_FIELDS = (
    "pages_4k",
    "pf_fixed",
    "refaults",
    "zaps_all_fast",
    "zaps_slot_leafs",
    "zaps_total_sptes",
    "remote_tlb_flush",
)

Shape = Callable[[Any], dict[str, Any]]


def _pick(*keys: str) -> Shape:
    return lambda body: {k: body.get(k) for k in keys}


def _slot(body: Any) -> dict[str, Any]:
    slot = body["memslot"]
    return {"change": body["change"], **{k: slot[k] for k in ("slot", "base_gfn", "npages")}}


def _zap(body: Any) -> dict[str, Any]:
    return {k: body["zap"].get(k) for k in (*ZAP_FIELDS, *ZAP_FIELDS_MORE)}


def _quirk(body: Any) -> dict[str, Any]:
    (q,) = [q for q in body["quirks"] if q["name"] == "KVM_X86_QUIRK_SLOT_ZAP_ALL"]
    return {k: q[k] for k in ("name", "bit", "enabled", "applicable")}


def _slot_body(gpa: int, hva: int) -> dict[str, Any]:
    return {"guest_phys_addr": hex(gpa), "memory_size": hex(4 * MiB), "userspace_addr": hex(hva)}


def _access(gpa: int, size: int) -> dict[str, Any]:
    return {"gpa": hex(gpa), "size": hex(size), "access": "write"}


@dataclass(frozen=True)
class Step:
    title: str
    method: str
    path: str  # `{vm}` is the tour's VM
    body: dict[str, Any] | None = None
    shape: Shape | None = None  # what to show of the answer; None: a list (zap events)


HVA0, HVA1 = 0x7F00_0000_0000, 0x7F00_0040_0000
TOUR: tuple[Step, ...] = (
    Step(
        "Create a VM (KVM_CREATE_VM)",
        "POST",
        "/v1/vms",
        {"name": "tour", "vm_type": "KVM_X86_DEFAULT_VM"},
        _pick("id", "vm_type_name"),
    ),
    Step("The VM", "GET", "/v1/vms/{vm}", None, _pick("slot_zap_all_applies", "zap_policy")),
    Step("Memslot 0: 4 MiB", "PUT", "/v1/vms/{vm}/memslots/0", _slot_body(0, HVA0), _slot),
    Step("Memslot 1: 4 MiB", "PUT", "/v1/vms/{vm}/memslots/1", _slot_body(4 * MiB, HVA1), _slot),
    Step(
        "The guest writes all 8 MiB",
        "POST",
        "/v1/vms/{vm}/vcpus/0/accesses",
        _access(0, 8 * MiB),
        _pick("pages", "mapped", "refaults"),
    ),
    Step(
        "Delete slot 1, quirk on: everything is zapped",
        "DELETE",
        "/v1/vms/{vm}/memslots/1",
        None,
        _zap,
    ),
    Step(
        "Slot 0 again: refaults",
        "POST",
        "/v1/vms/{vm}/vcpus/0/accesses",
        _access(0, 4 * MiB),
        _pick("mapped", "refaults"),
    ),
    Step(
        "Disable the quirk (KVM_CAP_DISABLE_QUIRKS2, 128)",
        "POST",
        "/v1/vms/{vm}/enable-cap",
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [128]},
        lambda body: _quirk(body["quirks"]),
    ),
    Step("Memslot 1 again", "PUT", "/v1/vms/{vm}/memslots/1", _slot_body(4 * MiB, HVA1), _slot),
    Step(
        "The guest writes slot 1",
        "POST",
        "/v1/vms/{vm}/vcpus/0/accesses",
        _access(4 * MiB, 4 * MiB),
        _pick("mapped", "refaults"),
    ),
    Step(
        "Delete slot 1, quirk off: only its SPTEs are zapped",
        "DELETE",
        "/v1/vms/{vm}/memslots/1",
        None,
        _zap,
    ),
    Step(
        "Slot 0 again: still mapped, no refault",
        "POST",
        "/v1/vms/{vm}/vcpus/0/accesses",
        _access(0, 4 * MiB),
        _pick("mapped", "spurious", "refaults"),
    ),
    Step("Zap events, newest first", "GET", "/v1/vms/{vm}/zaps"),
    Step("Stats", "GET", "/v1/vms/{vm}/stats", None, _pick(*STAT_FIELDS)),
)


@dataclass
class Outcome:
    step: Step
    status: int
    shown: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)


async def run_tour(client: httpx.AsyncClient) -> list[Outcome]:
    """Every step of the tour against `client`; raises on an answer that is not a success."""
    vm = ""
    out = []
    for step in TOUR:
        r = await client.request(
            step.method, step.path.format(vm=vm), json=step.body if step.body else None
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{step.method} {step.path}: {r.status_code} {r.text}")
        body = r.json()
        if step.path == "/v1/vms" and step.method == "POST":
            vm = body["id"]
        if step.shape is None:
            items = [{k: ev.get(k) for k in ("seq", "cause", *ZAP_FIELDS)} for ev in body["items"]]
            out.append(Outcome(step, r.status_code, items=items))
        else:
            out.append(Outcome(step, r.status_code, shown=step.shape(body)))
    return out


async def run_in_process() -> list[Outcome]:
    """The tour against a fresh app (its own temporary SQLite database), in this process."""
    from app.config import Settings
    from app.main import create_app

    with tempfile.TemporaryDirectory(prefix="vkmmu-demo-") as tmp:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{Path(tmp) / 'demo.db'}", log_level="WARNING"
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://vkmmu") as c:
                return await run_tour(c)


# Every table as wide as the widest, titles and calls on the left: a column of steps.
_LAYOUT: dict[str, Any] = {"width": 96, "title_justify": "left", "caption_justify": "left"}
# Wide enough for the zap events table without abbreviations, also when not on a terminal.
MIN_WIDTH = 100


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def render(outcomes: list[Outcome], console: Console) -> None:
    console.print("[bold]vkmmu demo[/bold]: the README's tour, in-process (docs/tour.sh)")
    for n, o in enumerate(outcomes, 1):
        title = f"{n}. {o.step.title}"
        call = f"{o.step.method} {o.step.path} → {o.status}"
        if o.items:
            table = Table(title=title, caption=call, box=box.SIMPLE_HEAVY, **_LAYOUT)
            for key in o.items[0]:
                table.add_column(key, justify="right" if key != "path" else "left")
            for item in o.items:
                table.add_row(*(_cell(v) for v in item.values()))
        else:
            table = Table(
                title=title,
                caption=call,
                box=box.SIMPLE_HEAVY,
                show_header=False,
                **(_LAYOUT | {"width": 64}),
            )
            table.add_column("field", style="cyan")
            table.add_column("value", justify="right")
            for key, value in o.shown.items():
                table.add_row(key, _cell(value))
        console.print(table)
    console.print(_verdict(outcomes))


def _verdict(outcomes: list[Outcome]) -> Table:
    """The point of the tour in one table: the same delete, with the quirk and without."""
    zaps = [o.shown for o in outcomes if o.step.method == "DELETE"]
    after = [
        o.shown
        for o, prev in zip(outcomes[1:], outcomes, strict=False)
        if prev.step.method == "DELETE"
    ]
    table = Table(
        title="Deleting slot 1: KVM_X86_QUIRK_SLOT_ZAP_ALL on vs off", box=box.ROUNDED, **_LAYOUT
    )
    for col in ("quirk", "zap path", "SPTEs zapped", "roots invalidated", "slot 0 refaults"):
        table.add_column(col, justify="left" if col in ("quirk", "zap path") else "right")
    for zap, then in zip(zaps, after, strict=True):
        table.add_row(
            "on" if zap["slot_zap_all"] else "off",
            _cell(zap["path"]),
            _cell(zap["sptes_zapped_total"]),
            _cell(zap["roots_invalidated"]),
            _cell(then.get("refaults")),
        )
    return table


def main(no_color: bool = False) -> int:
    console = Console(no_color=no_color, highlight=not no_color)
    console.width = max(console.width, MIN_WIDTH)
    render(asyncio.run(run_in_process()), console)
    return 0
