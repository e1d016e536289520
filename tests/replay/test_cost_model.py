"""The cost model: every default has a source, unsourced costs are never guessed."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.services import cost_model

DOC = (Path(__file__).resolve().parents[2] / "docs" / "cost-model.md").read_text()


def test_every_cost_carries_a_source_and_is_documented() -> None:
    assert {c.name for c in cost_model.COSTS} >= {
        "ept_violation",
        "zap_per_spte",
        "tlb_flush",
        "root_rebuild",
        "seamcall",
    }
    for c in cost_model.COSTS:
        assert c.source.strip(), c.name
        assert f"`{c.name}`" in DOC, c.name
        if c.default_ns is None:
            # Said plainly, not invented.
            assert "no published measurement" in c.source
        else:
            assert c.default_ns > 0
            # A measurement: where it was published and the figure it rests on.
            assert any(ch.isdigit() for ch in c.source) and len(c.source) > 80


def test_sourced_defaults_follow_from_the_cited_figures() -> None:
    by = cost_model.BY_NAME
    # 3.105203579 s to first-touch 262,144 pages per vCPU.
    assert by["ept_violation"].default_ns == pytest.approx(11845.4, abs=0.1)
    assert "3.105203579" in by["ept_violation"].source
    # 460 ms for every leaf of 128 GiB.
    assert by["zap_per_spte"].default_ns == pytest.approx(13.71, abs=0.01)
    assert "460 ms" in by["zap_per_spte"].source


def test_estimate_is_a_model_and_lists_what_it_could_not_price() -> None:
    counts = {"faults": 10, "sptes_zapped_total": 1000, "tlb_flushes": 3, "vcpu_kicks": 0}
    est = cost_model.estimate(counts, cost_model.resolve(None))
    assert est["model"] is True
    assert est["not_estimated"] == ["tlb_flush"]  # counted, no cost; kicks were not counted
    assert est["by_event_us"]["ept_violation"] == pytest.approx(118.454, abs=0.001)
    assert est["total_us"] == pytest.approx(sum(est["by_event_us"].values()), abs=0.01)
    priced = cost_model.estimate(counts, cost_model.resolve({"tlb_flush": 2000}))
    assert priced["not_estimated"] == [] and priced["by_event_us"]["tlb_flush"] == 6.0


def test_bad_costs_are_refused() -> None:
    with pytest.raises(cost_model.CostError):
        cost_model.resolve({"nope": 1})
    with pytest.raises(cost_model.CostError):
        cost_model.resolve({"tlb_flush": -1})
    with pytest.raises(cost_model.CostError):
        cost_model.resolve({"tlb_flush": True})
