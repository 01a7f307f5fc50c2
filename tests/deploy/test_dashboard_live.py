"""Every dashboard query through a real Prometheus scraping two real agents and a real
webhook while they work (``live.py``: pulls from a loopback hub, failed pulls, dedup, hits,
a peer read, a delete and a gc, a real init container falling back to the source; admissions
of every outcome over TLS):

- each query parses (``format_query``) and returns data, and data that moved: a non-zero
  value, except where the real processes have nothing to count (``NOTHING_TO_COUNT``, each
  with its reason);
- the variable queries list the two nodes and the namespace; the node filter narrows;
- what Prometheus holds is what happened (counts by node and label, the watermarks each
  agent was started with, the expiry of the webhook's certificate);
- ``promtool check metrics`` is clean on both real expositions, and every series the
  dashboard and the alert rules use is in them.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.deploy import families, live, prom
from tests.deploy.render import DEPLOY, ROOT
from webhook.tls import not_after

pytestmark = pytest.mark.slow  # real processes and a real Prometheus: ~16 s

DASHBOARD = json.loads((ROOT / "dashboards" / "modelcache.json").read_text())
QUERIES = prom.dashboard_queries(DASHBOARD)
RULES = yaml.safe_load((DEPLOY / "prometheus" / "modelcache-rules.yaml").read_text())

#: panels that show zero from the real processes, and why that is the truth
NOTHING_TO_COUNT = {
    ("Cached bytes and blobs by node", "B"):
        "bytes reserved for running pulls: none is running when the queries run",
}


@dataclass(frozen=True)
class Live:
    cluster: live.Cluster
    prometheus: prom.Prometheus
    targets: list[prom.Target]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A round of activity; Prometheus started and scraping twice; a second round; a
    scrape of every target after it."""
    workdir = tmp_path_factory.mktemp("live")
    with live.cluster(workdir) as cluster:
        cluster.round()
        targets = [prom.Target("modelcache-agent", agent.url.removeprefix("http://"),
                               {"namespace": live.NAMESPACE, "node": node})
                   for node, agent in cluster.agents.items()]
        targets.append(prom.Target("modelcache-webhook", cluster.webhook.address,
                                   {"namespace": live.NAMESPACE, "node": live.NODES[0]},
                                   scheme="https", ca_file=cluster.webhook.ca_file,
                                   server_name=live.SERVER_NAME))
        with prom.run_prometheus(workdir / "prometheus", targets) as prometheus:
            cluster.round()
            prometheus.wait_for_scrape_after([t.job for t in targets], time.time())
            yield Live(cluster, prometheus, targets)


def variables() -> dict[str, str]:
    return {"datasource": "prometheus", "namespace": live.NAMESPACE,
            "node": "|".join(live.NODES)}


def _values(result: list[dict[str, object]]) -> list[float]:
    return [float(r["value"][1]) for r in result]  # type: ignore[index]


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}/{q.ref_id}" for q in QUERIES])
def test_dashboard_query_returns_data(scene: Live, query: prom.PanelQuery) -> None:
    expr = prom.grafana_to_promql(query.expr, variables())
    scene.prometheus.format_query(expr)  # raises on a parse error
    result = scene.prometheus.query(expr)
    assert result, f"{query.panel}: no data for {expr}"
    values = _values(result)
    assert not any(math.isnan(v) for v in values), (query.panel, result)
    moved = any(v != 0 for v in values)
    if (query.panel, query.ref_id) in NOTHING_TO_COUNT:
        assert not moved, f"{query.panel} moves now: take it off NOTHING_TO_COUNT"
    else:
        assert moved, f"{query.panel}/{query.ref_id}: only zeros for {expr}: {result}"


@pytest.mark.parametrize("name", ["namespace", "node"])
def test_variable_query_lists_values(scene: Live, name: str) -> None:
    (variable,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    label, match = prom.parse_label_values(prom.variable_query(variable))
    assert match is not None
    values = scene.prometheus.label_values(label, prom.grafana_to_promql(match, variables()))
    assert set(values) == ({live.NAMESPACE} if name == "namespace" else set(live.NODES))


def test_node_filter_narrows_to_one_node(scene: Live) -> None:
    (q,) = [q for q in QUERIES if q.panel == "Store used vs capacity" and q.ref_id == "A"]
    expr = prom.grafana_to_promql(q.expr, {**variables(), "node": "node-b"})
    assert [r["metric"]["node"] for r in scene.prometheus.query(expr)] == ["node-b"]


def _by(scene: Live, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in scene.prometheus.query(expr)}


def test_prometheus_holds_what_happened(scene: Live) -> None:
    expected = scene.cluster.expected
    seen = {
        "cache_requests": _by(scene, "modelcache_cache_requests_total", "node", "result"),
        "pull_failures": _by(scene, "modelcache_pull_failures_total", "node", "reason"),
        "evictions": _by(scene, "modelcache_evictions_total", "node", "reason"),
        "served_bytes": _by(scene, "modelcache_served_bytes_total", "node", "to"),
        "verifications": _by(scene, "modelcache_verifications_total", "node", "result"),
        "dedup_hits": {(n, ""): v for (n,), v in
                       _by(scene, "modelcache_dedup_hits_total", "node").items()},
        "admissions": {("", o): v for (o,), v in
                       _by(scene, "modelcache_webhook_admissions_total", "outcome").items()},
        "csi_publishes": _by(scene, "modelcache_csi_publishes_total", "node", "outcome"),
    }
    for (metric, node, label), count in expected.items():
        assert seen[metric].get((node, label)) == count, (metric, node, label, seen[metric])
    for metric, values in seen.items():  # and nothing else moved
        extra = {k: v for k, v in values.items() if v and (metric, *k) not in expected}
        assert not extra, (metric, extra)
    # each agent's watermarks are the ones it was started with
    ratios = _by(scene, "modelcache_store_watermark_ratio", "node", "level")
    for node, (high, low) in live.WATERMARKS.items():
        assert (ratios[node, "high"], ratios[node, "low"]) == (high, low)
    # one volume kept published per round, on the CSI node only
    assert _by(scene, "modelcache_csi_volumes_published", "node") == {
        (live.CSI_NODE,): scene.cluster.rounds, ("node-b",): 0}
    # the certificate the webhook serves, as read by the webhook
    (expiry,) = _values(scene.prometheus.query(
        "modelcache_webhook_cert_expiry_timestamp_seconds"))
    assert expiry == not_after(scene.cluster.webhook.cert_file.read_bytes())
    # pulls by source and their time: two rounds of four good pulls and two failures
    assert _by(scene, "sum by (scheme, result) (modelcache_pull_duration_seconds_count)",
               "scheme", "result") == {("hf", "ok"): 8, ("hf", "error"): 2,
                                       ("http", "error"): 2}


def _used_series() -> set[str]:
    exprs = [q.expr for q in QUERIES] + [r["expr"] for g in RULES["groups"]
                                         for r in g["rules"]]
    return {name for expr in exprs for name in re.findall(r"\bmodelcache_\w+", expr)}


def test_expositions_pass_promtool_and_carry_every_series_used(scene: Live) -> None:
    used = _used_series()
    assert used <= families.known_series(), used - families.known_series()
    exported: set[str] = set()
    for target in scene.targets:
        url = f"{target.scheme}://{target.address}/metrics"
        body = prom.fetch(url, ca_file=target.ca_file, server_name=target.server_name)
        assert prom.check_metrics(body) == [], url
        exported |= {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()
                     if line and not line.startswith("#")}
    assert used - exported == set()


def test_unknown_grafana_variable_is_an_error() -> None:
    with pytest.raises(KeyError):
        prom.grafana_to_promql('up{pod=~"$pod"}', variables())


def test_stop_process_ends_what_it_started() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    prom.stop_process(proc)
    assert proc.returncode is not None
