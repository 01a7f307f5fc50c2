"""The metric families the agent and the webhook export, read from their own registries
(``agent/metrics.py``, ``webhook/metrics.py``), as the names a query uses: counters with
their ``_total``, histograms by their base name (``HISTOGRAMS``; queries add ``_bucket``,
``_count``, ``_sum``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.metrics import Metrics
from webhook.metrics import WebhookMetrics


def _families(registry: CollectorRegistry) -> dict[str, str]:
    """Query name -> type, for every family of a registry."""
    return {f"{m.name}_total" if m.type == "counter" else m.name: m.type
            for m in registry.collect()}


AGENT = _families(Metrics().registry)
WEBHOOK = _families(WebhookMetrics().registry)
AGENT_METRICS = frozenset(AGENT)
WEBHOOK_METRICS = frozenset(WEBHOOK)
HISTOGRAMS = frozenset(name for name, kind in {**AGENT, **WEBHOOK}.items()
                       if kind == "histogram")


def series_names(name: str) -> set[str]:
    """The sample names a family's query name stands for."""
    if name in HISTOGRAMS:
        return {f"{name}_{suffix}" for suffix in ("bucket", "count", "sum")}
    return {name}


def known_series() -> set[str]:
    """Every sample name the two programs export."""
    return {s for name in AGENT_METRICS | WEBHOOK_METRICS for s in series_names(name)}
