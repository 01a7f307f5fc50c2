"""This node's ``modelcache.io/m-<16 hex of key>=ready`` labels: exactly the models ready here.

Ready -> label added; failed, being pulled again or gone (evicted) -> label removed. Only
labels with that prefix are ever written, by merge patch, so kubelet's and the admin's labels
are never touched. The first reconciliation (once the node is seen) removes stale labels
left by an earlier run for models that are not ready here any more.

On shutdown the labels stay: they describe the store on the node's disk, which outlives the
agent process. A DaemonSet rolling update therefore does not make every warm node look cold
for a moment (the webhook's affinity would then steer replicas away from warm nodes), and
pods on the node still find the model through their hostPath mount while the agent restarts.
The next agent reconciles them at its start.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.index import READY, Index, Model
from common.backoff import Backoff
from common.errors import ModelcacheError
from common.kube.client import KubeClient
from common.reference import LABEL_PREFIX

log = logging.getLogger(__name__)
VALUE = "ready"


class NodeLabels:
    def __init__(self, kube: KubeClient, node: str, index: Index,
                 backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.kube = kube
        self.node = node
        self.index = index
        self._backoff = backoff
        #: this node's ``m-*`` labels as last seen or written (``None``: node not seen yet)
        self.present: dict[str, str] | None = None
        self._dirty = asyncio.Event()
        #: patches sent (for tests)
        self.patches = 0
        index.on_change(self._changed)

    def desired(self) -> set[str]:
        return {m.ref.node_label for m in self.index if m.state == READY}

    def observe(self, node: dict[str, Any]) -> None:
        """The node as the informer last saw it (someone may have changed our labels)."""
        labels = (node.get("metadata") or {}).get("labels") or {}
        self.present = {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}
        self._dirty.set()

    def _changed(self, model: Model) -> None:
        self._dirty.set()

    async def run(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile()
                backoff.reset()
            except ModelcacheError as e:
                delay = backoff.next(e)
                log.warning("node labels not updated; retrying", extra={
                    "node": self.node, "error": str(e), "delay": round(delay, 2)})
                await asyncio.sleep(delay)
                self._dirty.set()

    async def reconcile(self) -> None:
        if self.present is None:
            return
        want = self.desired()
        add = {k: VALUE for k in want if self.present.get(k) != VALUE}
        remove = set(self.present) - want
        if not add and not remove:
            return
        self.patches += 1
        await self.kube.patch_node_labels(self.node, add, remove)
        log.info("node labels updated", extra={
            "node": self.node, "added": sorted(add), "removed": sorted(remove)})
        self.present = {k: VALUE for k in want}
