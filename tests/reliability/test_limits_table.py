"""The README's limits table lists every budget and bound a setting controls, with its
default (issue 14 "Done when"): a new limit setting must be documented there, or named
below as not a limit."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
# Settings that bound nothing a client can make the service hold or parse.
NOT_LIMITS = {
    "host",
    "port",
    "database_url",
    "sqlite_synchronous",
    "log_level",
    "cors_origins",
    "admin_token",
    "metrics_token",
    "token_secret",
    # The modelled host's KVM module parameters (kvm-memslots.md), not bounds.
    "host_enable_pml",
    "host_eager_page_split",
    "host_nx_huge_pages",
    "host_tdp_mmu",
}


def _limits_rows() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def _shown(default: object) -> str:
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_every_limit_setting_is_in_the_limits_table_with_its_default() -> None:
    rows = _limits_rows()
    missing = []
    for name, field in Settings.model_fields.items():
        if name in NOT_LIMITS:
            continue
        var = f"VKMMU_{name.upper()}"
        row = next((r for r in rows if f"`{var}`" in r), None)
        if row is None:
            missing.append(f"{var}: no row")
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        defaults = re.findall(r"`([^`]*)`", cells[2])
        if _shown(field.default) not in defaults:
            missing.append(f"{var}: default {_shown(field.default)} not in {cells[2]!r}")
    assert not missing, missing
