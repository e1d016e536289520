"""`vkmmu batch` against a real server: regions in batches, stopping at the first rejection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.batch_cli import read_regions
from app.cli import main
from tests.e2e.test_server import Server, running

MiB = 1 << 20
HVA = 1 << 40


@pytest.fixture
def small_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("VKMMU_MAX_BATCH", "64")
    with running(tmp_path) as srv:
        yield srv


def regions(n: int, first: int = 0) -> list[dict[str, int]]:
    return [
        {
            "slot": i,
            "guest_phys_addr": i * 2 * MiB,
            "memory_size": 2 * MiB,
            "userspace_addr": HVA + i * 2 * MiB,
        }
        for i in range(first, first + n)
    ]


def test_batch_applies_every_region_a_batch_at_a_time(
    small_batches: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with httpx.Client(base_url=small_batches.base, timeout=30) as c:
        vm = c.post("/v1/vms", json={}).json()["id"]
        path = tmp_path / "slots.json"
        path.write_text(json.dumps({"regions": regions(200)}))
        args = ["batch", str(path), "--vm", vm, "--url", small_batches.base, "--batch-size", "64"]
        assert main(args) == 0
        out = capsys.readouterr()
        assert json.loads(out.out) == {"applied": 200, "rejected": None, "not_attempted": 0}
        assert "applied 200/200" in out.err
        assert (
            c.get(f"/v1/vms/{vm}/memslots", params={"limit": 1000}).json()["items"][-1]["slot"]
            == 199
        )

        # A region overlapping slot 0 stops the run; later batches are never sent.
        bad = regions(10, 300) + [{**regions(1)[0], "slot": 500}] + regions(100, 400)
        path.write_text("\n".join(json.dumps(r) for r in bad))
        assert main([*args[:1], str(path), *args[2:]]) == 1
        summary = json.loads(capsys.readouterr().out)
        assert summary["applied"] == 10 and summary["not_attempted"] == 100
        assert summary["rejected"]["slot"] == 500 and summary["rejected"]["errno_name"] == "EEXIST"
        listed = c.get(f"/v1/vms/{vm}/memslots", params={"limit": 1000}).json()["items"]
        assert len(listed) == 210

        # Too large a batch for the server: its 422 is reported, nothing applied.
        path.write_text(json.dumps(regions(65, 600)))
        assert main([*args[:1], str(path), *args[2:6], "--batch-size", "65"]) == 1
        assert "VKMMU_MAX_BATCH" in capsys.readouterr().err


def test_bad_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert read_regions('[{"slot": 1}]') == [{"slot": 1}]
    assert read_regions('{"slot": 1}\n{"slot": 2}\n') == [{"slot": 1}, {"slot": 2}]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["batch", str(bad), "--vm", "vm-x"]) == 2
    assert main(["batch", str(tmp_path / "missing.json"), "--vm", "vm-x"]) == 2
    assert "vkmmu batch" in capsys.readouterr().err
