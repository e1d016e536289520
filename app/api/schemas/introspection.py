"""Read-only views of the MMU: translate, mappings, roots, stats, audit, TDX state."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model

from app.api.schemas.common import Answer, LevelCounts
from app.api.schemas.tdx import MapGpaPending, TdxLifecycle
from app.engine import uapi
from app.engine.stat_descriptors import DESCRIPTORS
from app.engine.tdx import OPS as TDX_OPS
from app.engine.views import TranslateView

# Host pages behind an HVA have pfn `hva >> 12`, always below this; guest_memfd pages get
# pfns from 1 << 38 up (docs/engine.md, "Page tables").
HVA_PFN_LIMIT = 1 << 35

RootRoleName = Literal["direct", "mirror"]


class WalkEntry(Answer):
    """One entry of the walk, raw and decoded (EPT bits). A non-present entry has only
    `raw`, `level`, `present`, `mmio` (and `mmio_generation` when it is an MMIO SPTE) besides
    `index` and `table_pfn`; the decoded bits are then null."""

    raw: str = Field(description='The 64-bit entry, "0x…".')
    level: int
    index: int = Field(description="Index of the entry in its table (0…511).")
    table_pfn: int = Field(description="pfn of the table holding the entry.")
    present: bool
    mmio: bool | None = Field(default=None, description="Non-present: an MMIO SPTE.")
    mmio_generation: int | None = Field(default=None, description="An MMIO SPTE's generation.")
    leaf: bool | None = None
    pfn: int | None = Field(default=None, description="The next table's or the page's pfn.")
    r: bool | None = None
    w: bool | None = None
    x: bool | None = None
    accessed: bool | None = None
    dirty: bool | None = None
    host_writable: bool | None = None
    mmu_writable: bool | None = None
    memtype: int | None = None
    ipat: bool | None = None


class TranslateLeaf(Answer):
    """Where the GPA lands. `pfn` is the page the SPTE maps; a page of the VMM's memory is
    named by its host virtual address (`hva`, as in the memslot's `userspace_addr`), a
    guest_memfd page by its file and offset."""

    level: int
    pfn: int = Field(description="The frame the leaf SPTE maps (the page's, plus the offset).")
    backing: Literal["host_memory", "guest_memfd"]
    hva: int | None = Field(description="host_memory: the host virtual address of the GPA.")
    guest_memfd: int | None = Field(description="guest_memfd: the file's fd.")
    guest_memfd_offset: int | None = Field(description="guest_memfd: byte offset of the GPA.")
    r: bool
    w: bool
    x: bool


class RootWalk(Answer):
    root: int
    role: RootRoleName
    as_id: int
    valid: bool
    walk: list[WalkEntry] = Field(description="From the root's level down to the last entry.")
    leaf: TranslateLeaf | None = Field(description="null when the walk ends non-present.")


class Translation(Answer):
    gpa: int
    gfn: int = Field(description="The GFN without a TD's shared bit.")
    roots: list[RootWalk]


def translation(view: TranslateView, gmem_files: list[dict[str, Any]]) -> Translation:
    """The engine's walk, with the leaf's host address named for what it is."""
    gpa = view["gpa"]
    roots = []
    for r in view["roots"]:
        leaf = r["leaf"]
        out: dict[str, Any] | None = None
        if leaf is not None:
            pfn = leaf["pfn"]
            out = {k: leaf[k] for k in ("level", "pfn", "r", "w", "x")}
            out |= {"hva": None, "guest_memfd": None, "guest_memfd_offset": None}
            if pfn < HVA_PFN_LIMIT:
                out |= {"backing": "host_memory", "hva": (pfn << uapi.PAGE_SHIFT) | (gpa & 0xFFF)}
            else:
                out["backing"] = "guest_memfd"
                for f in gmem_files:
                    first = f["base_pfn"]
                    if first <= pfn < first + (f["size"] >> uapi.PAGE_SHIFT):
                        offset = ((pfn - first) << uapi.PAGE_SHIFT) | (gpa & 0xFFF)
                        out |= {"guest_memfd": f["fd"], "guest_memfd_offset": offset}
                        break
        roots.append({**r, "leaf": out})
    return Translation.model_validate({**view, "roots": roots})


class Mapping(Answer):
    """A run of leaf SPTEs: consecutive GFNs at one level, consecutive pfns, same bits."""

    root: int
    role: RootRoleName
    level: int
    gfn: int = Field(description="First GFN (without a TD's shared bit).")
    position: int = Field(description="First GFN as the root indexes it (shared bit included).")
    pfn: int = Field(description="First pfn.")
    npages: int = Field(description="4 KiB pages the run covers.")
    r: bool
    w: bool
    x: bool


class RootInfo(Answer):
    id: int
    as_id: int
    role: RootRoleName
    level: int = Field(description="The root table's level (4 or 5).")
    valid: bool
    obsolete: bool
    generation: int
    table_pfn: int
    sptes: LevelCounts = Field(description="Leaf SPTEs under the root by level.")


class Violation(Answer):
    rule: str = Field(description="The invariant broken, e.g. `no_freed_page_mapped`.")
    detail: str
    root: int | None = None
    table: int | None = None
    gfn: int | None = None
    pfn: int | None = None


class AuditChecked(Answer):
    tables: int
    leaves: LevelCounts


class Audit(Answer):
    ok: bool
    violations: list[Violation] = Field(description="At most 100.")
    checked: AuditChecked


class StatDescriptorInfo(Answer):
    """As the kernel's `struct kvm_stats_desc` describes a stat."""

    name: str
    kind: Literal["cumulative", "instant", "peak"] = Field(
        description="KVM_STATS_TYPE_CUMULATIVE (only grows), _INSTANT (a value now) or _PEAK."
    )
    unit: Literal["none", "bytes", "seconds", "cycles", "boolean"]
    source: Literal["kvm_vm", "kvm_vcpu", "vkmmu"] = Field(
        description="A kernel VM stat, a kernel vCPU stat summed over the vCPUs, or vkmmu's own."
    )
    description: str
    tdx_only: bool = Field(description="Reported for TDs only.")


class StatDescriptors(Answer):
    items: list[StatDescriptorInfo]


def _stat_field(d: Any) -> tuple[Any, Any]:
    text = f"{d.description} ({d.kind})"
    if d.tdx_only:
        return (int | None, Field(default=None, description=f"{text}. TDs only."))
    return (int, Field(description=text))


# One field per stat, with its descriptor's text: the TDX ones are present for TDs only.
Stats: type[Answer] = create_model(  # type: ignore[call-overload]
    "Stats",
    __base__=Answer,
    __doc__="The kernel's VM stat names first, then vkmmu's own (see GET /v1/stats/descriptors).",
    **{d.name: _stat_field(d) for d in DESCRIPTORS},
)

TdxOps: type[Answer] = create_model(  # type: ignore[call-overload]
    "TdxOps",
    __base__=Answer,
    __doc__="SEAMCALL-like operations on the TD, by the TDX module's names.",
    **{
        op.lower().replace(".", "_"): (int, Field(alias=op, description=f"{op} count"))
        for op in TDX_OPS
    },
)


class TdxOpRecord(Answer):
    op: str
    gfn_start: int
    gfn_end: int


class TdxState(Answer):
    ops: TdxOps  # type: ignore[valid-type]
    epoch: int = Field(description="TD epoch (TDH.MEM.TRACK increments it).")
    hkid_assigned: bool
    accepted_pages: int
    pending_reaccept_pages: int = Field(description="Accepted pages a zap took away.")
    reaccepts: int
    recent: list[TdxOpRecord] = Field(description="The latest operations, oldest first.")
    lifecycle: TdxLifecycle = Field(description="The TD's lifecycle (KVM_TDX_INIT_VM …).")
    map_gpa_pending: list[MapGpaPending] = Field(
        description="vCPUs waiting in a MapGPA KVM_EXIT_HYPERCALL: the chunk and the end."
    )
