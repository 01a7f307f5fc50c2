"""Every dashboard query through a real Prometheus scraping the agent's and the webhook's
metric endpoints: each parses (format_query) and returns data, each variable query returns
the nodes and namespace, and `promtool check metrics` is clean on both expositions.

PHASE 1: the endpoints are STAND-INS (tests/deploy/standin.py) serving the exact metric
names with synthetic values, since the real agent and webhook do not exist yet. The fixture
``endpoints`` is the one place to switch to a real agent pulling a model and a real webhook
admitting pods over loopback; ``prom.py`` stays as it is.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme

from tests.deploy import prom, standin
from tests.deploy.render import ROOT

pytestmark = pytest.mark.slow  # a real Prometheus: ~10 s, mostly waiting for its first scrape

DASHBOARD = json.loads((ROOT / "dashboards" / "modelcache.json").read_text())
QUERIES = prom.dashboard_queries(DASHBOARD)
NAMESPACE = "modelcache"
NODES = ("node-a", "node-b")
WEBHOOK_NAME = "modelcache-webhook.modelcache.svc"


@dataclass(frozen=True)
class Endpoint:
    target: prom.Target
    url: str


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Endpoint]]:
    """Two agents (one per node) over HTTP and a webhook over TLS, with the labels that
    Kubernetes discovery and the ServiceMonitors give them."""
    ca = trustme.CA()
    cert = ca.issue_cert(WEBHOOK_NAME, "127.0.0.1")
    ca_file = tmp_path_factory.mktemp("tls") / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(tls)

    agents = [standin.Exporter(*standin.agent_standin(node)) for node in NODES]
    webhook = standin.Exporter(*standin.webhook_standin(time.time() + 90 * 86400), tls=tls)
    with agents[0], agents[1], webhook:
        out = [Endpoint(prom.Target("modelcache-agent", a.address,
                                    {"namespace": NAMESPACE, "node": node}),
                        f"http://{a.address}/metrics")
               for a, node in zip(agents, NODES, strict=True)]
        out.append(Endpoint(prom.Target("modelcache-webhook", webhook.address,
                                        {"namespace": NAMESPACE, "node": NODES[0]},
                                        scheme="https", ca_file=str(ca_file),
                                        server_name=WEBHOOK_NAME),
                            f"https://{webhook.address}/metrics"))
        yield out


@pytest.fixture(scope="module")
def prometheus(endpoints: list[Endpoint],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[prom.Prometheus]:
    with prom.run_prometheus(tmp_path_factory.mktemp("prometheus"),
                             [e.target for e in endpoints]) as p:
        yield p


def variables() -> dict[str, str]:
    return {"datasource": "prometheus", "namespace": NAMESPACE, "node": "|".join(NODES)}


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}/{q.ref_id}" for q in QUERIES])
def test_dashboard_query_returns_data(prometheus: prom.Prometheus, query: prom.PanelQuery) -> None:
    expr = prom.grafana_to_promql(query.expr, variables())
    prometheus.format_query(expr)  # raises on a parse error
    assert prometheus.query(expr), f"{query.panel}: no data for {expr}"


@pytest.mark.parametrize("name", ["namespace", "node"])
def test_variable_query_lists_values(prometheus: prom.Prometheus, name: str) -> None:
    (variable,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    label, match = prom.parse_label_values(prom.variable_query(variable))
    assert match is not None
    values = prometheus.label_values(label, prom.grafana_to_promql(match, variables()))
    assert set(values) == ({NAMESPACE} if name == "namespace" else set(NODES))


def test_node_filter_narrows_to_one_node(prometheus: prom.Prometheus) -> None:
    (q,) = [q for q in QUERIES if q.panel == "Store used vs capacity" and q.ref_id == "A"]
    expr = prom.grafana_to_promql(q.expr, {**variables(), "node": "node-b"})
    assert [r["metric"]["node"] for r in prometheus.query(expr)] == ["node-b"]


def test_expositions_pass_promtool_check_metrics(endpoints: list[Endpoint]) -> None:
    for e in endpoints:
        body = prom.fetch(e.url, ca_file=e.target.ca_file)
        assert prom.check_metrics(body) == [], e.url
        families = {line.split()[2] for line in body.decode().splitlines()
                    if line.startswith("# TYPE ")}
        expected = (standin.WEBHOOK_METRICS if e.target.job == "modelcache-webhook"
                    else standin.AGENT_METRICS)
        missing = {f for f in expected
                   if f not in families and f.removesuffix("_total") not in families}
        assert missing == set(), e.url


def test_unknown_grafana_variable_is_an_error() -> None:
    with pytest.raises(KeyError):
        prom.grafana_to_promql('up{pod=~"$pod"}', variables())


def test_stop_process_ends_what_it_started() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    prom.stop_process(proc)
    assert proc.returncode is not None
