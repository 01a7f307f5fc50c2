"""How the one Kubernetes client connects and retries: the settings of ``common.kube``.

The agent builds them from its flags (``--kubeconfig``); the webhook takes the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: Path | None = None
    """A kubeconfig file to connect with; ``None``: the pod's in-cluster service account."""

    request_timeout: float = 30.0
    """Seconds one Kubernetes API request (not a watch) may take."""

    watch_timeout: float = 300.0
    """Seconds a watch asks the apiserver to keep it open (``timeoutSeconds``), jittered up to
    twice this so that a thousand agents do not reconnect together (as client-go does)."""

    backoff_base: float = 0.5
    """First delay in seconds before a failed list or watch is retried; doubles each failure,
    with full jitter (``common/backoff.py``)."""

    backoff_max: float = 30.0
    """Longest delay between list or watch attempts."""

    list_page_size: int = 500
    """Objects per page when an informer lists (``limit``/``continue``)."""

    event_controller: str = "modelcache.io/agent"
    """``reportingController`` of the Events the agent emits."""
