"""`vkmmu compare` (in process) and `vkmmu replay` against a real server, in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.replay_cli import chunks
from app.services.qemu_trace import parse
from tests.e2e.test_server import Server, running
from tests.replay.conftest import TRACES

BAR = TRACES / "pci-bar-remap.trace"
BOOT = TRACES / "pc-boot-smm.trace"


def test_compare_prints_counts_and_a_separate_model_estimate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["compare", str(BAR), "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in answer["variants"]]
    # The trace fits a TD (address space 0 only, no read-only slots).
    assert names == ["quirk on", "quirk off", "TD"]
    on, off, td = answer["variants"]
    assert on["slot_zap_all"] and not off["slot_zap_all"] and not td["slot_zap_all"]
    # The one refused call (ret=-17) is refused by every variant: nothing mismatches.
    assert on["trace_mismatches"] == off["trace_mismatches"] == td["trace_mismatches"] == 0
    assert on["refaults"] > 0 and off["refaults"] == 0
    assert on["final_memslots"] == off["final_memslots"] == td["final_memslots"]

    assert main(["compare", str(BAR), "--format", "md", "--cost", "tlb_flush=2000"]) == 0
    md = capsys.readouterr().out
    assert "| pci-bar-remap.trace | quirk on | quirk off | TD |" in md
    assert "a model, not a measurement" in md
    assert main(["compare", str(BAR)]) == 0
    table = capsys.readouterr().out
    assert "refaults" in table and "estimate" in table


def test_compare_leaves_out_the_td_when_the_trace_has_smm_slots(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["compare", str(TRACES / "memory-hot-unplug.trace"), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["variants"]) == 3
    assert (
        main(["compare", str(TRACES / "vga-toggle.trace"), "--touch", "none", "--format", "json"])
        == 0
    )
    assert [v["name"] for v in json.loads(capsys.readouterr().out)["variants"]] == [
        "quirk on",
        "quirk off",
    ]
    assert main(["compare", "/nonexistent.trace"]) == 2
    assert main(["compare", str(BAR), "--cost", "nope=1"]) == 2


def test_chunks_are_whole_lines_numbered_as_in_the_file() -> None:
    text = BOOT.read_text()
    parts = list(chunks(BOOT, 8192))
    assert len(parts) > 5
    assert b"".join(body for _, body in parts).decode() == text
    for first, body in parts:
        assert len(body) <= 8192
        assert body.endswith(b"\n")
        assert text.splitlines()[first - 1] == body.decode().splitlines()[0]


@pytest.fixture
def small_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # A body limit far below the trace's size: the CLI must split it.
    monkeypatch.setenv("VKMMU_MAX_BODY_BYTES", "16384")
    with running(tmp_path) as srv:
        yield srv


@pytest.mark.e2e
def test_replay_streams_a_trace_over_the_body_limit_in_chunks(
    small_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert BOOT.stat().st_size > 4 * 16384
    with httpx.Client(base_url=small_server.base) as c:
        r = c.post("/v1/vms/x/replay", content=BOOT.read_bytes())
        assert r.status_code == 413  # what a single request gets
    # Chunks start too big for the service and are halved until they fit.
    argv = ["replay", str(BOOT), "--url", small_server.base, "--chunk-bytes", "65536"]
    assert main([*argv, "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    calls = parse(BOOT.read_text()).calls
    assert answer["applied"] == len(calls) and answer["mismatches"] == 0
    assert [r["line"] for r in answer["results"]] == [c.line for c in calls]
    with httpx.Client(base_url=small_server.base) as c:
        slots = c.get(f"/v1/vms/{answer['vm']}/memslots", params={"limit": 1000}).json()
    final = {c.slot: c for c in calls}  # each slot's last call
    assert len(slots["items"]) == sum(1 for c in final.values() if c.size)
    # Into an existing VM, in the table format: the same calls again now mismatch
    # (creating slots that exist), and the summary says where.
    assert main([*argv, "--vm", answer["vm"]]) == 0
    out = capsys.readouterr().out
    assert "answered otherwise than the trace" in out and "line " in out
