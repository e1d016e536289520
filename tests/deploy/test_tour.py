"""The README's tour is real: docs/tour.sh, run with curl and jq against a real server, gives
the output README.md shows (ids, ETags, times and durations masked)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from types import ModuleType

import pytest

from tests.conftest import require
from tests.deploy.procs import REPO

pytestmark = pytest.mark.e2e


def tour_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vkmmu_tour", REPO / "docs" / "tour.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_readme_tour_matches_a_real_run() -> None:
    require(shutil.which("curl") is not None, "curl (.ci/deps/curl-jq.sh)")
    require(shutil.which("jq") is not None, "jq (.ci/deps/curl-jq.sh)")
    tour = tour_module()
    fresh = tour.generate()
    shown = tour.readme_block()
    assert shown.strip(), "the README has no tour: run make readme-tour"
    assert tour.normalise(fresh) == tour.normalise(shown), (
        "README.md's tour differs from a real run: run make readme-tour"
    )


def test_the_tour_shows_the_quirk() -> None:
    """The README block holds the story, not only matching text: fast zap with the quirk,
    slot-only zap without, refaults only after the fast zap."""
    shown = tour_module().readme_block()
    assert '"path":"zap_all_fast","slot":1,"slot_zap_all":true,"sptes_zapped_total":2048' in shown
    assert '"path":"zap_slot_leafs","slot":1,"slot_zap_all":false,"sptes_zapped_total":1024' in (
        shown
    )
    assert '{"mapped":1024,"refaults":1024}' in shown
    assert '{"mapped":0,"spurious":1024,"refaults":0}' in shown
    assert "KVM_CAP_DISABLE_QUIRKS2" in shown and '"args": [128]' in shown


def test_normalise_masks_only_what_varies() -> None:
    norm = tour_module().normalise
    a = '{"id":"vm-01a236dd45b1a05a245cf7","at":1796216330.85,"duration_us":947,"seq":1}'
    b = '{"id":"vm-01a236dd45b1a05a245ca0","at":1796216999.1,"duration_us":12,"seq":1}'
    assert norm(a) == norm(b)
    assert norm(a) != norm(b.replace('"seq":1', '"seq":2'))
    assert norm('ETag: "12"') == norm('ETag: "7"')
    assert norm('"created_at":"2026-12-02T12:58:50.454449Z"') == norm(
        '"created_at":"2027-01-01T00:00:00+00:00"'
    )


# Docs that parallel work adds; every other relative link must resolve in this tree.
ADDED_BY_OTHER_ISSUES = {"docs/api.md", "docs/metrics.md", "docs/cost-model.md"}


def test_readme_links_work_from_a_clone() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)
    local = [link for link in links if "://" not in link]
    assert "docs/deploy.md" in local and "docs/tour.sh" in local
    missing = [
        link for link in local if not (REPO / link).exists() and link not in ADDED_BY_OTHER_ISSUES
    ]
    assert not missing, missing


def test_configuration_table_lists_every_setting() -> None:
    """The README's configuration table: one row per Settings field, no row for anything else."""
    from app.config import Settings

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"(?m)^\| `(VKMMU_[A-Z_]+)` \|", section)
    assert sorted(rows) == sorted(f"VKMMU_{name.upper()}" for name in Settings.model_fields)
