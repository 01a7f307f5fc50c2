"""Every metric the webhook exports, on one registry per process.

``modelcache_`` prefix, unit suffixes, bounded labels (an outcome, a result: never a pod,
a namespace or a URI). The Grafana dashboard uses exactly these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .admission import OUTCOMES

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: fine at the low end: a planned admission takes well under a millisecond to a few
ADMISSION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class WebhookMetrics:
    """The webhook's metric families, registered on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.admissions = Counter(
            "modelcache_webhook_admissions_total",
            "Admission reviews answered, by outcome: mutated, skipped (allowed unchanged), "
            "denied (a bad annotation or a conflict), error (a bad request or a crash).",
            ["outcome"], registry=r,
        )
        self.duration = Histogram(
            "modelcache_webhook_admission_duration_seconds",
            "Time from a review's arrival to its answer (read, plan, patch, encode).",
            buckets=ADMISSION_BUCKETS, registry=r,
        )
        self.cert_reloads = Counter(
            "modelcache_webhook_cert_reloads_total",
            "Reloads of the serving certificate after its files changed, by result.",
            ["result"], registry=r,
        )
        self.cert_expiry = Gauge(
            "modelcache_webhook_cert_expiry_timestamp_seconds",
            "Expiry (notAfter, Unix time) of the serving certificate in use; set when it is "
            "loaded and on every reload.",
            registry=r,
        )
        for outcome in OUTCOMES:
            self.admissions.labels(outcome=outcome)
        for result in ("ok", "error"):
            self.cert_reloads.labels(result=result)

    def cert_reloaded(self, ok: bool) -> None:
        self.cert_reloads.labels(result="ok" if ok else "error").inc()

    def cert_loaded(self, not_after: float) -> None:
        self.cert_expiry.set(not_after)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
