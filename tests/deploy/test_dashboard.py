"""dashboards/modelcache.json against Grafana's dashboard model, without a Grafana server.

- Round trip through Grafana's own generated types (grafana-foundation-sdk, Grafana 11.6
  schema, with the panel and Prometheus query plugins registered): every key of our JSON must
  survive, so a misspelt or misplaced field (which those types drop) is caught.
- Structure Grafana relies on: unique panel ids, grid positions inside 24 columns without
  overlaps, rows, one datasource variable of type prometheus used by every panel and target,
  `node` and `namespace` query variables, no `__inputs`, unique refIds.
- Queries use only the metric names the agent and the webhook export.
Running every query through a real Prometheus is ``test_dashboard_live.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy import prom
from tests.deploy.families import AGENT_METRICS, HISTOGRAMS, WEBHOOK_METRICS
from tests.deploy.render import ROOT

DASHBOARD = ROOT / "dashboards" / "modelcache.json"
SCHEMA_VERSION = 41  # Grafana 11.6 / 12
GRID_COLUMNS = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def _lost_keys(ours: Any, theirs: Any, path: str = "$") -> list[str]:
    """Paths in ``ours`` that ``theirs`` lacks or holds differently."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: not an object in Grafana's model"]
        out = []
        for k, v in ours.items():
            if k not in theirs:
                out.append(f"{path}.{k}: unknown to Grafana's model")
            else:
                out += _lost_keys(v, theirs[k], f"{path}.{k}")
        return out
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: list not kept"]
        return [e for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                for e in _lost_keys(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} read back as {theirs!r}"]


def grafana_round_trip(dashboard: dict[str, Any]) -> list[str]:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    back = json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))
    return _lost_keys(dashboard, back)


def test_round_trips_through_grafanas_model(dashboard: dict[str, Any]) -> None:
    assert grafana_round_trip(dashboard) == []


def test_the_round_trip_catches_a_misspelt_field(dashboard: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(dashboard))
    panel = next(p for p in all_panels(broken) if p["type"] == "timeseries")
    panel["fieldConfig"]["defaults"]["unitt"] = "bytes"
    panel["targets"][0]["legendFromat"] = "x"
    panel["options"]["legend"]["placment"] = "right"
    lost = grafana_round_trip(broken)
    assert len(lost) == 3 and all("unknown to Grafana's model" in line for line in lost), lost


def test_dashboard_header(dashboard: dict[str, Any]) -> None:
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    assert dashboard["schemaVersion"] == SCHEMA_VERSION
    assert dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # importable anywhere


def test_panels_have_unique_ids_and_titles(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for p in all_panels(dashboard):
        assert p["title"], p["id"]
        if p["type"] != "row":
            assert p.get("description"), p["title"]


def test_grid_positions_fit_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels(dashboard):
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"} and all(isinstance(v, int) for v in g.values())
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        if p["type"] == "row":
            assert g["x"] == 0 and g["w"] == GRID_COLUMNS and g["h"] == 1, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_rows_group_the_panels_below_them(dashboard: dict[str, Any]) -> None:
    """Panels are listed top to bottom, each under a row, as Grafana saves them."""
    top = [(p["gridPos"]["y"], p["gridPos"]["x"]) for p in dashboard["panels"]]
    assert top == sorted(top)
    assert dashboard["panels"][0]["type"] == "row"
    for p in dashboard["panels"]:
        if p["type"] == "row":
            assert p["collapsed"] is False and p["panels"] == [], p["title"]


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "node"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE, name
        label, match = prom.parse_label_values(prom.variable_query(v))
        assert label == name and match and match.startswith("modelcache_agent_info"), name
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
    # node depends on namespace, so namespace comes first
    order = [v["name"] for v in dashboard["templating"]["list"]]
    assert order.index("datasource") < order.index("namespace") < order.index("node")


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for p in all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), p["title"]
    assert "${datasource}" not in json.dumps([q.expr for q in prom.dashboard_queries(dashboard)])


def test_queries_use_only_exported_metrics_and_known_variables(dashboard: dict[str, Any]) -> None:
    known = set(AGENT_METRICS | WEBHOOK_METRICS)
    known |= {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "count", "sum")}
    variables = {v["name"]: ".*" for v in dashboard["templating"]["list"]}
    for q in prom.dashboard_queries(dashboard):
        used = set(re.findall(r"\bmodelcache_\w+", q.expr))
        assert used and used <= known, (q.panel, used - known)
        prom.grafana_to_promql(q.expr, variables)  # raises on an unknown variable
        if used & WEBHOOK_METRICS or any(u.startswith("modelcache_webhook_") for u in used):
            assert "$node" not in q.expr, q.panel  # the webhook is not per node
        else:
            assert 'node=~"$node"' in q.expr and 'namespace=~"$namespace"' in q.expr, q.panel


def test_the_panels_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(q.expr for q in prom.dashboard_queries(dashboard))
    titles = {p["title"] for p in all_panels(dashboard)}
    for needed in ("Hit ratio", "Pulls by source", "Pull throughput by source",
                   "Pull time p50 / p95", "Store used vs capacity", "Evictions by reason",
                   "Dedup savings", "Models by state per node", "Fallbacks to the source by node",
                   "Admission latency p99", "Admission errors", "CSI publishes by outcome",
                   "CSI publish wait p50 / p95", "CSI volumes published by node"):
        assert needed in titles, needed
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    assert "histogram_quantile(0.99," in exprs
    assert 'modelcache_store_watermark_ratio{level="high"' in exprs
    assert 'result="fallback"' in exprs and 'outcome="error"' in exprs


def test_the_docs_list_exactly_the_exported_families() -> None:
    """docs/architecture.md (both programs) and docs/webhook.md (the webhook) name every
    metric family the code registers, and nothing else."""
    def listed(doc: str) -> set[str]:
        section = (ROOT / "docs" / doc).read_text().split("## Metrics", 1)[1]
        return set(re.findall(r"^\| `(modelcache_\w+)`", section.split("\n## ", 1)[0], re.M))

    assert listed("architecture.md") == AGENT_METRICS | WEBHOOK_METRICS
    assert listed("webhook.md") == WEBHOOK_METRICS
