"""`vkmmu replay --token`: a tenant replays a trace into a VM of its own on a service with
tokens turned on; without a token the service answers 401 and the command says so."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.cli import main
from tests.e2e.test_server import Server
from tests.replay.conftest import TRACES

ADMIN = "replay-admin-token"


@pytest.mark.e2e
def test_replay_sends_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VKMMU_ADMIN_TOKEN", raising=False)
    server = Server(
        tmp_path / "vkmmu.db", tmp_path / "server.log", env={"VKMMU_ADMIN_TOKEN": ADMIN}
    )
    server.start()
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=server.base, headers=admin) as c:
            token = c.post("/v1/tokens", json={"tenant": "tracer"}).json()["token"]
        trace = str(TRACES / "vga-toggle.trace")
        argv = ["replay", trace, "--url", server.base, "--format", "json"]
        assert main([*argv, "--token", token]) == 0
        answer = json.loads(capsys.readouterr().out)
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {token}"}) as c:
            vm = c.get(f"/v1/vms/{answer['vm']}").json()
        assert vm["tenant"] == "tracer" and answer["mismatches"] == 0
        assert main(argv) != 0
        assert "401" in capsys.readouterr().err
    finally:
        server.stop()
