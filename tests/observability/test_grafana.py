"""deploy/grafana/vkmmu.json: every PromQL expression names metrics the service exports, and
is valid PromQL (promtool)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .test_metrics import promtool
from .workload import delete_a_slot, refault_after_zap_all

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "vkmmu.json"
METRIC = re.compile(r"\bvkmmu_[a-zA-Z0-9_:]+")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    return exprs


def exported(text: str) -> set[str]:
    """Every name a query may use: each family's samples, and its declared sample names
    even before a labelled series has its first child."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(fam.name + s for s in _SUFFIXES.get(fam.type, ()))
        names.update(s.name for s in fam.samples)
    return names


async def test_every_expression_names_an_exported_metric(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm = await delete_a_slot(client, quirk=True)
    await refault_after_zap_all(client, vm)
    text = (await client.get("/metrics")).text
    names = exported(text)
    exprs = expressions()
    assert len(exprs) >= 20
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, expr
        assert used <= names, (expr, used - names)

    # Valid PromQL once Grafana's variables are substituted (label_values() is Grafana's).
    rules = [
        e.replace("$__rate_interval", "5m").replace("$vm_type", ".*")
        for e in exprs
        if not e.startswith("label_values(")
    ]
    body = "groups:\n  - name: grafana\n    rules:\n" + "".join(
        f"      - record: grafana:expr{i}\n        expr: {json.dumps(e)}\n"
        for i, e in enumerate(rules)
    )
    (tmp_path / "rules.yml").write_text(body)
    out = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out
