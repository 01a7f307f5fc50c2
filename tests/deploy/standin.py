"""STAND-IN exporters for the live dashboard test, until the real agent and webhook exist.

They serve the metric names of DESIGN.md and agent/metrics.py with synthetic values that
move on every scrape, over HTTP (the agent's port) and HTTPS (the webhook's TLS port), so
that ``prom.py``'s Prometheus fixture and query runner can be proven now. The live test is
meant to switch to a real agent pulling a model and a real webhook admitting pods; nothing
in ``prom.py`` depends on this module.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.metrics import Metrics

#: every metric family the dashboard and the alerts may use, by exporter
AGENT_METRICS = frozenset({
    "modelcache_agent_info",
    "modelcache_cache_requests_total",
    "modelcache_pulled_bytes_total",
    "modelcache_pull_duration_seconds",
    "modelcache_pull_failures_total",
    "modelcache_served_bytes_total",
    "modelcache_store_bytes",
    "modelcache_store_blobs",
    "modelcache_models",
    "modelcache_evictions_total",
    "modelcache_evicted_bytes_total",
    "modelcache_dedup_hits_total",
    "modelcache_store_watermark_ratio",
})
WEBHOOK_METRICS = frozenset({
    "modelcache_webhook_admissions_total",
    "modelcache_webhook_admission_duration_seconds",
    "modelcache_webhook_cert_expiry_timestamp_seconds",
})
HISTOGRAMS = frozenset({"modelcache_pull_duration_seconds",
                        "modelcache_webhook_admission_duration_seconds"})

GiB = 1024**3


def agent_standin(node: str) -> tuple[CollectorRegistry, Callable[[], None]]:
    """The agent's own Metrics class (watermark gauge included), fed with
    synthetic activity; returns the registry and a tick that advances it one scrape."""
    m = Metrics(node=node, version="0.1.0")
    m.store_watermark.labels(level="high").set(0.80)
    m.store_watermark.labels(level="low").set(0.70)
    m.store_bytes.labels(kind="capacity").set(500 * GiB)
    m.store_bytes.labels(kind="reserved").set(0)
    m.models.labels(state="failed").set(0)
    state = {"used": 300 * GiB}

    def tick() -> None:
        m.cache_requests.labels(result="hit").inc(8)
        m.cache_requests.labels(result="miss").inc(2)
        m.cache_requests.labels(result="fallback").inc(1)
        for scheme, size in (("hf", 3 * GiB), ("s3", GiB)):
            m.pulled_bytes.labels(scheme=scheme).inc(size)
            m.pull_duration.labels(scheme=scheme, result="ok").observe(42.0)
        m.pull_duration.labels(scheme="oci", result="failed").observe(3.0)
        m.pull_failures.labels(reason="source_unreachable").inc()
        m.served_bytes.labels(to="pod").inc(10 * GiB)
        m.served_bytes.labels(to="peer").inc(GiB)
        state["used"] += GiB
        m.store_bytes.labels(kind="used").set(state["used"])
        m.store_bytes.labels(kind="cached").set(state["used"] - 20 * GiB)
        m.store_bytes.labels(kind="dedup_saved").set(12 * GiB)
        m.store_blobs.set(137)
        m.models.labels(state="ready").set(5)
        m.models.labels(state="pulling").set(1)
        m.evictions.labels(reason="watermark").inc()
        m.evicted_bytes.labels(reason="watermark").inc(2 * GiB)
        m.dedup_hits.inc(3)

    tick()
    return m.registry, tick


def webhook_standin(cert_expiry: float) -> tuple[CollectorRegistry, Callable[[], None]]:
    """The webhook's metric names (DESIGN.md, issue 6, and the cert expiry the alerts need)."""
    r = CollectorRegistry(auto_describe=True)
    admissions = Counter("modelcache_webhook_admissions_total", "Admissions by outcome.",
                         ["outcome"], registry=r)
    duration = Histogram("modelcache_webhook_admission_duration_seconds",
                         "Time to answer an admission review.",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                         registry=r)
    expiry = Gauge("modelcache_webhook_cert_expiry_timestamp_seconds",
                   "Expiry (Unix time) of the serving certificate in use.", registry=r)
    expiry.set(cert_expiry)

    def tick() -> None:
        for outcome, n in (("mutated", 20), ("skipped", 5), ("denied", 2), ("error", 1)):
            admissions.labels(outcome=outcome).inc(n)
        for seconds in (0.002, 0.004, 0.008, 0.03):
            duration.observe(seconds)

    tick()
    return r, tick


@dataclass
class Exporter:
    """A /metrics endpoint on 127.0.0.1 in a thread; every scrape first ticks the values."""

    registry: CollectorRegistry
    tick: Callable[[], None]
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                exporter.tick()
                body = generate_latest(exporter.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Exporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
