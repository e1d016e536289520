"""What a TD's SEAMCALL record says, range by range: the lifecycle calls carry no GFN range,
PAGE.ADD and MR.EXTEND name the one page, a destroyed TD reclaims its leaves by their GFN run
and each S-EPT table by the GFNs it spans (kvm-private-tdx.md §5.3, §5.4, §5.9), and every
re-accept of a page that was accepted before is counted."""

from __future__ import annotations

from app.engine.ops import parse
from tests.engine.test_tdx import accept, make_td, ops
from tests.engine.test_tdx_lifecycle import SEPT_VE_DISABLE, add, lifecycle, lifecycle_td

RECLAIM = "TDH.PHYMEM.PAGE.RECLAIM"
PAGE = 4096


def recent(td: object) -> list[tuple[str, int, int]]:
    return [(e["op"], e["gfn_start"], e["gfn_end"]) for e in td.tdx_state()["recent"]]  # type: ignore[attr-defined]


def test_lifecycle_calls_are_counted_from_zero_and_carry_no_range() -> None:
    td = lifecycle_td()
    life = lifecycle(td)
    assert life["attributes"] == SEPT_VE_DISABLE and life["td_state"] == "initialized"
    assert life["ops"] == {
        "TDH.MNG.CREATE": 1,
        "TDH.MNG.KEY.CONFIG": 1,
        "TDH.MNG.INIT": 1,
        "TDH.VP.CREATE": 1,
        "TDH.VP.INIT": 1,
        "TDH.MEM.PAGE.ADD": 0,
        "TDH.MR.EXTEND": 0,
        "TDH.MR.FINALIZE": 0,
    }
    assert recent(td) == [
        ("TDH.MNG.CREATE", 0, 0),
        ("TDH.MNG.KEY.CONFIG", 0, 0),
        ("TDH.MNG.INIT", 0, 0),
        ("TDH.VP.CREATE", 0, 0),
        ("TDH.VP.INIT", 0, 0),
    ]
    td.apply(parse("tdx_finalize_vm"))
    assert recent(td)[-1] == ("TDH.MR.FINALIZE", 0, 0)
    assert lifecycle(td)["ops"]["TDH.MR.FINALIZE"] == 1


def test_page_add_and_extend_name_the_page_they_add() -> None:
    td = lifecycle_td()
    add(td, 5 * PAGE, 2)
    added = [r for r in recent(td) if r[0] in ("TDH.MEM.PAGE.ADD", "TDH.MR.EXTEND")]
    assert added == [
        ("TDH.MEM.PAGE.ADD", 5, 6),
        ("TDH.MR.EXTEND", 5, 6),
        ("TDH.MEM.PAGE.ADD", 6, 7),
        ("TDH.MR.EXTEND", 6, 7),
    ]


def test_destroy_reclaims_leaves_by_their_run_and_tables_by_their_span() -> None:
    td, _ = make_td()
    accept(td, 8 * PAGE, 4 * PAGE)
    td.apply(parse("destroy", {}))
    assert [r for r in recent(td) if r[0] == RECLAIM] == [
        (RECLAIM, 8, 12),  # the four private leaves
        (RECLAIM, 0, 512),  # the level-1 S-EPT table
        (RECLAIM, 0, 512 * 512),  # level 2
        (RECLAIM, 0, 512**3),  # level 3 (the root belongs to the TDX module)
    ]


def test_every_reaccept_is_counted() -> None:
    """A page accepted, removed (its attribute flipped to shared and back) and accepted again
    is a re-accept, each time it happens."""
    td, _ = make_td()
    for round_ in (1, 2):
        accept(td, 0, PAGE)
        for private in (0, 8):  # KVM_MEMORY_ATTRIBUTE_PRIVATE off, then on again
            td.apply(
                parse(
                    "set_memory_attributes",
                    {"address": 0, "size": PAGE, "attributes": private, "flags": 0},
                )
            )
        assert td.tdx_state()["pending_reaccept_pages"] == 1
        res = accept(td, 0, PAGE)
        assert (res["accepted"], res["reaccepted"]) == (1, 1)
        assert td.tdx_state()["reaccepts"] == round_
        assert ops(td)["TDG.MEM.PAGE.ACCEPT"] == 1 + round_  # pages newly accepted
