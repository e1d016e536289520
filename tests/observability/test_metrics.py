"""GET /metrics: promtool and the parser accept it, labels answer the documented questions,
series stay bounded with many VMs."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import MiB, new_vm, ok, put_slot
from tests.conftest import require

from .workload import delete_a_slot, refault_after_zap_all, touch

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def documented_queries() -> dict[str, str]:
    text = DOCS.read_text()
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^```promql (\S+)\n(.*?)^```", text, re.M | re.S)
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    exe = shutil.which("promtool")
    require(exe is not None, "promtool (.ci/deps/promtool.sh)")
    assert exe is not None
    r = subprocess.run(
        [exe, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


async def test_promtool_and_the_parser_accept_both_formats(client: httpx.AsyncClient) -> None:
    vm = await delete_a_slot(client, quirk=True)
    await refault_after_zap_all(client, vm)
    await delete_a_slot(client, quirk=False)
    td = await new_vm(client, vm_type="KVM_X86_TDX_VM")
    assert td
    assert (await client.get("/v1/vms/vm-0")).status_code == 404
    assert (await client.get("/no/such/route")).status_code == 404

    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    promtool("check", "metrics", stdin=r.text)
    parsed = samples(r.text)
    assert parsed["vkmmu_build_info", (("python", parsed_python(r.text)), ("version", "0.1.0"))]
    assert parsed["vkmmu_vms", ()] == 3.0
    assert parsed["vkmmu_memslots", ()] == 2.0  # slot 0 of each default VM
    # The HTTP route is the template, never the concrete path.
    assert any(
        n == "vkmmu_http_requests_total"
        and dict(lbl).get("route") == "/v1/vms/{vm}/memslots/{slot}"
        for n, lbl in parsed
    )
    http = {lbl for n, lbl in parsed if n == "vkmmu_http_requests_total"}
    assert (("method", "GET"), ("route", "/v1/vms/{vm}"), ("status", "404")) in http
    assert (("method", "GET"), ("route", "<unmatched>"), ("status", "404")) in http
    # HELP says whose figure it is.
    assert "# HELP vkmmu_vm_remote_tlb_flush_total The kernel's stat remote_tlb_flush" in r.text
    assert "# HELP vkmmu_zap_events_total" in r.text and "vkmmu's own" in r.text

    om = await client.get("/metrics", headers={"accept": OPENMETRICS})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    # promtool reads the Prometheus text format only; the OpenMetrics parser is strict.
    families = {f.name: f for f in openmetrics_families(om.text)}
    assert families["vkmmu_zap_events"].type == "counter"
    assert families["vkmmu_zap_duration_seconds"].type == "histogram"


def parsed_python(text: str) -> str:
    m = re.search(r'vkmmu_build_info\{python="([^"]+)"', text)
    assert m
    return m.group(1)


async def test_zap_labels_come_from_the_zap_event(client: httpx.AsyncClient) -> None:
    on = await delete_a_slot(client, quirk=True)
    await delete_a_slot(client, quirk=False)
    fault = await refault_after_zap_all(client, on)
    assert fault["refaults"] == 16
    parsed = samples((await client.get("/metrics")).text)
    base = {"cause": "memslot_delete", "vm_type": "KVM_X86_DEFAULT_VM"}

    def value(name: str, **labels: str) -> float:
        return parsed[name, tuple(sorted({**base, **labels}.items()))]

    fast = {"path": "zap_all_fast", "slot_zap_all": "on"}
    leafs = {"path": "zap_slot_leafs", "slot_zap_all": "off"}
    assert value("vkmmu_zap_events_total", **fast) == 1
    assert value("vkmmu_zap_events_total", **leafs) == 1
    # The fast zap takes both slots' 4K leaves (16 + 8), the precise one slot 1's only.
    assert value("vkmmu_zap_sptes_total", **fast, root="direct", level="4k") == 24
    assert value("vkmmu_zap_sptes_total", **leafs, root="direct", level="4k") == 8
    assert value("vkmmu_zap_sptes_total", **leafs, root="mirror", level="4k") == 0
    assert value("vkmmu_zap_duration_seconds_count", **leafs) == 1
    assert value("vkmmu_refaults_total", **fast) == 16
    # Present: slot 0 of each VM (refaulted on one, never zapped on the other).
    assert parsed["vkmmu_sptes", (("level", "4k"), ("root", "direct"))] == 16 + 16


async def test_series_stay_bounded_with_a_thousand_vms(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(metrics_max_vms=50)
    service = client.app.state.service  # type: ignore[attr-defined]
    first = await new_vm(client)
    ok(await put_slot(client, first, 0, gpa=0, size=MiB))
    await touch(client, first, 0, 8192)
    for _ in range(999):
        await service.create_vm(name=None)
    text = (await client.get("/metrics")).text
    parsed = samples(text)
    assert parsed["vkmmu_vms", ()] == 1000
    assert parsed["vkmmu_metrics_vms_omitted", ()] == 950
    per_vm = defaultdict(set)
    for name, labels in parsed:
        if "vm" in dict(labels):
            per_vm[dict(labels)["vm"]].add(name)
    assert len(per_vm) == 50
    # The newest first: the first VM (the oldest) has none.
    assert first not in per_vm
    # 22 kernel stat names per VM, plus families whose size does not depend on VMs.
    assert len(parsed) < 50 * 22 + 400, len(parsed)


async def test_deleted_vms_lose_their_series(client: httpx.AsyncClient) -> None:
    vm = await new_vm(client)
    assert f'vm="{vm}"' in (await client.get("/metrics")).text
    ok(await client.delete(f"/v1/vms/{vm}"))
    assert f'vm="{vm}"' not in (await client.get("/metrics")).text


def _series_line(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"{name}{{{inner}}}"


async def test_documented_promql_gives_one_series_per_quirk_setting(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two real scrapes, before and after a memslot delete with the quirk on and one with it
    off (and a refault after the fast zap), evaluated by `promtool test rules`."""
    queries = documented_queries()
    assert {"zap-cost-sptes", "zap-cost-seconds", "refaults-after-zap-all"} <= set(queries)
    before = samples((await client.get("/metrics")).text)
    on = await delete_a_slot(client, quirk=True)
    await delete_a_slot(client, quirk=False)
    await refault_after_zap_all(client, on)
    after = samples((await client.get("/metrics")).text)

    # A counter that did not exist yet at the first scrape was 0 then.
    lines = []
    for key, v in sorted(after.items()):
        name, labels = key
        if not name.startswith("vkmmu_zap_") and not name.startswith("vkmmu_refaults"):
            continue
        lines.append(
            f"      - series: '{_series_line(name, labels)}'\n"
            f"        values: '{before.get(key, 0.0)!r} {v!r}'\n"
        )
    sums = {k: v for k, v in after.items() if k[0] == "vkmmu_zap_duration_seconds_sum"}
    counts = {k: v for k, v in after.items() if k[0] == "vkmmu_zap_duration_seconds_count"}
    mean = {
        dict(k[1])["slot_zap_all"]: sums[k] / counts[("vkmmu_zap_duration_seconds_count", k[1])]
        for k in sums
        if dict(k[1])["cause"] == "memslot_delete"
    }
    assert set(mean) == {"on", "off"}
    test = (
        "rule_files: []\n"
        "evaluation_interval: 1m\n"
        "tests:\n"
        "  - interval: 1m\n"
        "    input_series:\n" + "".join(lines) + "    promql_expr_test:\n"
        f"      - expr: '{queries['zap-cost-sptes']}'\n"
        "        eval_time: 1m\n"
        "        exp_samples:\n"
        '          - labels: \'{path="zap_all_fast", slot_zap_all="on"}\'\n'
        "            value: 24\n"
        '          - labels: \'{path="zap_slot_leafs", slot_zap_all="off"}\'\n'
        "            value: 8\n"
        f"      - expr: '{queries['refaults-after-zap-all']}'\n"
        "        eval_time: 1m\n"
        "        exp_samples:\n"
        "          - labels: '{vm_type=\"KVM_X86_DEFAULT_VM\"}'\n"
        "            value: 16\n"
        # The mean time per delete: one series per quirk setting, each the measured mean.
        f"      - expr: 'count by (slot_zap_all, path) ({' '.join(queries['zap-cost-seconds'].split())})'\n"  # noqa: E501
        "        eval_time: 1m\n"
        "        exp_samples:\n"
        '          - labels: \'{path="zap_all_fast", slot_zap_all="on"}\'\n'
        "            value: 1\n"
        '          - labels: \'{path="zap_slot_leafs", slot_zap_all="off"}\'\n'
        "            value: 1\n"
    )
    (tmp_path / "test.yml").write_text(test)
    out = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert "SUCCESS" in out
