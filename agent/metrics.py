"""Every metric the agent exports, in one place, on one registry per process.

Names carry the ``modelcache_`` prefix and a unit suffix; label values are bounded (a source
scheme, a result, a reason, a state): never a URI, a path, a key or a digest. The Grafana
dashboard in ``dashboards/`` and the alert rules in ``deploy/`` use exactly these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: bounded label values
CACHE_RESULTS = ("hit", "miss", "fallback")
MODEL_STATES = ("pulling", "ready", "failed")
STORE_KINDS = ("used", "capacity", "cached", "dedup_saved", "reserved")
SERVED_TO = ("pod", "peer")
WATERMARK_LEVELS = ("high", "low")
CSI_OUTCOMES = ("ok", "pending", "invalid", "denied", "error")

PUBLISH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: why a page-cache warming was skipped or stopped short (agent/pagecache/warmer.py)
PAGECACHE_SKIPS = ("disabled", "opted_out", "download_mode", "resident", "memory", "budget",
                   "unavailable", "error")

#: passed; failed (the signature or the files do not verify); unsigned (no signature file);
#: policy (the policy named is missing or malformed)
VERIFY_RESULTS = ("passed", "failed", "unsigned", "policy")

PULL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Metrics:
    """The agent's metric families, registered on a registry of their own."""

    def __init__(self, node: str = "", version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge(
            "modelcache_agent_info", "The agent: its node and version (always 1).",
            ["node", "version"], registry=r,
        )
        self.info.labels(node=node, version=version).set(1)
        self.cache_requests = Counter(
            "modelcache_cache_requests_total",
            "Requests for a model, by result: hit (warm), miss (pulled), fallback (source).",
            ["result"], registry=r,
        )
        self.pulled_bytes = Counter(
            "modelcache_pulled_bytes_total",
            "Bytes downloaded from model sources, by source scheme.",
            ["scheme"], registry=r,
        )
        self.pull_duration = Histogram(
            "modelcache_pull_duration_seconds",
            "Time to pull a model (resolve, fetch, verify, publish), by scheme and result.",
            ["scheme", "result"], buckets=PULL_BUCKETS, registry=r,
        )
        self.pull_failures = Counter(
            "modelcache_pull_failures_total",
            "Pulls that failed, by reason.",
            ["reason"], registry=r,
        )
        self.served_bytes = Counter(
            "modelcache_served_bytes_total",
            "Bytes handed out: to pods (the size of a ready model on each cache hit and on "
            "each requested pull that completes; linked, not copied) and to peer agents "
            "(blob reads).",
            ["to"], registry=r,
        )
        self.store_bytes = Gauge(
            "modelcache_store_bytes",
            "The store: filesystem used and capacity, cached blob bytes, bytes saved by "
            "dedup, bytes reserved for running pulls.",
            ["kind"], registry=r,
        )
        self.store_watermark = Gauge(
            "modelcache_store_watermark_ratio",
            "Eviction watermarks, as a fraction of the store's filesystem: eviction starts "
            "above high and stops at low.",
            ["level"], registry=r,
        )
        self.store_blobs = Gauge(
            "modelcache_store_blobs", "Distinct blobs in the store.", registry=r,
        )
        self.models = Gauge(
            "modelcache_models", "Models known to the agent, by state.", ["state"], registry=r,
        )
        self.evictions = Counter(
            "modelcache_evictions_total",
            "Models evicted, by reason (watermark, quota, inodes, no_space, api).",
            ["reason"], registry=r,
        )
        self.evicted_bytes = Counter(
            "modelcache_evicted_bytes_total",
            "Bytes freed by eviction and garbage collection, by reason.",
            ["reason"], registry=r,
        )
        self.dedup_hits = Counter(
            "modelcache_dedup_hits_total",
            "Files not downloaded because identical content was already stored.",
            registry=r,
        )
        self.csi_publishes = Counter(
            "modelcache_csi_publishes_total",
            "CSI NodePublishVolume calls, by outcome: ok (mounted), pending (the model is "
            "not ready yet: UNAVAILABLE with its progress, kubelet asks again), invalid (a bad "
            "request), denied (the pod was not authenticated or may not have the model), "
            "error (anything else).",
            ["outcome"], registry=r,
        )
        self.csi_publish_wait = Histogram(
            "modelcache_csi_publish_wait_seconds",
            "Time from a CSI volume's first NodePublishVolume to its mount, kubelet's "
            "retries included: how long a pod waited for its model.",
            buckets=PUBLISH_BUCKETS, registry=r,
        )
        self.csi_volumes = Gauge(
            "modelcache_csi_volumes_published",
            "CSI volumes published now (mounted, their models in use).", registry=r,
        )
        self.pagecache_warmed_bytes = Counter(
            "modelcache_pagecache_warmed_bytes_total",
            "Bytes of models read into the page cache ahead of the pods that load them.",
            registry=r,
        )
        self.pagecache_warmings = Counter(
            "modelcache_pagecache_warmings_total",
            "Page-cache warmings that ran to the end (every file of the model resident).",
            registry=r,
        )
        self.pagecache_skipped = Counter(
            "modelcache_pagecache_warmings_skipped_total",
            "Page-cache warmings skipped or stopped short, by reason (disabled, opted_out, "
            "download_mode, resident, memory, budget, unavailable, error).",
            ["reason"], registry=r,
        )
        for reason in PAGECACHE_SKIPS:
            self.pagecache_skipped.labels(reason=reason)
        self.verifications = Counter(
            "modelcache_verifications_total",
            "Signature checks of models under a verify policy, by result (passed, failed, "
            "unsigned, policy).",
            ["result"], registry=r,
        )
        for result in VERIFY_RESULTS:
            self.verifications.labels(result=result)
        for result in CACHE_RESULTS:
            self.cache_requests.labels(result=result)
        for state in MODEL_STATES:
            self.models.labels(state=state)
        for kind in STORE_KINDS:
            self.store_bytes.labels(kind=kind)
        for level in WATERMARK_LEVELS:
            self.store_watermark.labels(level=level)
        for to in SERVED_TO:
            self.served_bytes.labels(to=to)
        for outcome in CSI_OUTCOMES:
            self.csi_publishes.labels(outcome=outcome)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
