"""The agent in a cluster: what the Kubernetes API says in, what the node holds out.

In: the agent's own Node (its labels), the CachedModels (what to keep warm, ``warm.py``) and
the pods on this node (what is in use, ``pods.py`` -> ``usage.py``), each through an
``common.kube`` informer that loses no change (the Node and the pods by field selector:
nothing of other nodes). Out: node labels (``nodelabels.py``), this node's NodeCache and
the CachedModels' Events (``status.py``), and Events on the Node (disk pressure, from the
evictor's hooks).

Start-up: the informers list, in-use is known once the pods are listed, and the first pulls
wait a delay derived from the node's name (``startup_delay``) so that a thousand agents
starting together do not hit a hub at the same second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent.cluster.nodelabels import NodeLabels
from agent.cluster.pods import (
    PodDirectory,
    holder,
    hostpath_keys,
    models_of,
    pending,
    pod_key,
    running,
)
from agent.cluster.status import StatusWriter
from agent.cluster.warm import Warm
from agent.eviction.usage import Usage
from agent.index import Index
from agent.pagecache.warmer import PageCacheWarmer
from agent.pull.credentials import CredentialsProvider
from agent.pull.puller import Puller
from agent.settings import AgentSettings
from common.errors import ModelcacheError
from common.kube.client import KubeClient
from common.kube.informer import WatchEvent, object_key
from common.reference import parse

log = logging.getLogger(__name__)
Obj = dict[str, Any]
RESTART_SECONDS = 5.0


def startup_delay(node: str, limit: float) -> float:
    """A delay in ``[0, limit)`` seconds, the same for a node at every start and spread
    evenly across nodes (a hash of the node's name)."""
    if limit <= 0:
        return 0.0
    fraction = int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big") / 2**64
    return fraction * limit


class Controller:
    def __init__(self, kube: KubeClient, settings: AgentSettings, index: Index, puller: Puller,
                 credentials: CredentialsProvider, pods: PodDirectory, usage: Usage,
                 warmer: PageCacheWarmer | None = None,
                 claim: Callable[[str], None] | None = None) -> None:
        self.kube = kube
        self.node = settings.node_name
        self.settings = settings.cluster
        self.pods = pods
        self.usage = usage
        self.warmer = warmer
        #: makes ``models/<key>`` the agent's own (``Store.claim_model_dir``)
        self.claim = claim
        self.labels = NodeLabels(kube, self.node, index)
        self.status = StatusWriter(kube, self.node, index, self.settings.status_interval)
        fixed = [parse(m.uri, m.include, m.verify).key for m in settings.warm if m.pin]
        self.warm = Warm(puller, index, credentials, self.status, self.settings, fixed)
        self.node_informer = kube.watch_node(self.node)
        self.pod_informer = kube.watch_pods_on_node(self.node)
        self.cm_informer = kube.watch_cached_models()
        #: set once the first pulls may start (informers synced, start-up delay over)
        self.started = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.node_informer.run(_safe(self._on_node)), name="node-informer")
            tasks.create_task(self.pod_informer.run(_safe(self._on_pod)), name="pod-informer")
            tasks.create_task(self.cm_informer.run(_safe(self._on_cached_model)),
                              name="cachedmodel-informer")
            tasks.create_task(self._in_use_known(), name="in-use-known")
            tasks.create_task(_supervised("node-labels", self.labels.run), name="node-labels")
            tasks.create_task(_supervised("status", self.status.run), name="status")
            tasks.create_task(self._warm(), name="warm")

    async def _in_use_known(self) -> None:
        await self.pod_informer.synced.wait()
        self.pods.synced.set()
        self.usage.known.set()
        log.info("pods on this node listed: in-use known", extra={
            "node": self.node, "pods": len(self.pods)})

    async def _warm(self) -> None:
        await self.node_informer.synced.wait()
        await self.cm_informer.synced.wait()
        delay = startup_delay(self.node, self.settings.startup_jitter)
        if delay:
            log.info("first pulls after the start-up delay", extra={
                "node": self.node, "seconds": round(delay, 2)})
            await asyncio.sleep(delay)
        self.started.set()
        await _supervised("warm", self.warm.run)

    # --- informer handlers ---------------------------------------------------------------

    async def _on_node(self, event: WatchEvent) -> None:
        if event.type == "DELETED":
            return
        self.warm.node(event.object)
        self.labels.observe(event.object)
        self.status.node_seen(event.object)

    async def _on_pod(self, event: WatchEvent) -> None:
        pod = event.object
        key = pod_key(pod)
        if event.type == "DELETED" or not running(pod):
            self.pods.remove(key)
            self.usage.drop(holder(key))
            return
        known = self.pods.get(key)
        new = known is None or _uid(known) != _uid(pod)
        if new and self.claim is not None:
            await self._claim(pod)
        await self.pods.put(pod)
        models = models_of(pod)
        self.usage.set(holder(key), models)
        if new and pending(pod) and self.warmer is not None:
            for model in models:  # its images are being pulled: read the model meanwhile
                self.warmer.want(model, pod=key, trigger="pod")

    async def _claim(self, pod: Obj) -> None:
        """Make the model directories the pod's hostPath names, now that it is bound here:
        kubelet waits for them (type ``Directory``) and never makes them itself."""
        assert self.claim is not None
        for key in hostpath_keys(pod):
            try:
                await asyncio.to_thread(self.claim, key)
            except ModelcacheError as e:
                log.error("cannot make a pod's model directory", extra={
                    "pod": pod_key(pod), "key": key, "error": str(e)})

    async def _on_cached_model(self, event: WatchEvent) -> None:
        self.warm.cached_model(object_key(event.object),
                               None if event.type == "DELETED" else event.object)

    # --- hooks for the evictor -----------------------------------------------------------

    def evicting(self, key: str, reason: str) -> None:
        """A model is about to be evicted for ``reason``: its CachedModels' Events and
        status say why."""
        self.status.evicted(key, reason)

    async def pressure(self, message: str) -> None:
        """The store is under disk pressure: a Warning Event on this Node."""
        node = self.node_informer.get(self.node) or {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node}}
        await self.kube.emit_event(node, "DiskPressure", message, "Warning",
                                   action="Evict")


def _uid(obj: Obj) -> str | None:
    uid = (obj.get("metadata") or {}).get("uid")
    return uid if isinstance(uid, str) else None


async def _supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a loop that should never end; if it crashes (a bug, an unexpected OS error), log
    and start it again rather than leave the node unmanaged."""
    while True:
        try:
            await loop()
            return
        except Exception:
            log.exception("cluster loop crashed; restarting it", extra={"loop": name})
            await asyncio.sleep(RESTART_SECONDS)


def _safe(handler: Callable[[WatchEvent], Awaitable[None]]
          ) -> Callable[[WatchEvent], Awaitable[None]]:
    """A handler that logs its failures rather than stopping its informer."""

    async def run(event: WatchEvent) -> None:
        try:
            await handler(event)
        except Exception:
            log.exception("informer handler failed", extra={
                "type": event.type, "object": object_key(event.object)})

    return run
