"""A fleet of simulated nodes reporting to the fake apiserver, to measure what the control
plane costs per state change (tests/cluster/test_cluster_controlplane.py, bench/controlplane.py).

Each simulated node is an agent's cluster side without its data path: the real
``StatusWriter`` (``agent/cluster/status.py``) over its own ``Index``, and the real
CachedModel informer (``common.kube``) every agent runs, both over HTTP to the fake
apiserver through the real client. The load generator drives the models in the indexes
through a rollout of one CachedModel that selects every node: each node starts pulling,
reports progress, then is ready, the nodes spread evenly over a window of ``window``
seconds per phase. The webhook's real counts controller (``webhook/counts.py``) sums the
NodeCaches, flushed at every second of the window. Time is virtual (both the writers'
and the controller's clocks), so the figures depend on the protocol, not on how fast
this machine runs a thousand coroutines.

The figures are what crossed the wire (``FakeKubeApi.traffic``): bytes written (request
bodies) and bytes sent on watch streams, per resource, and the sizes of the objects.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cluster.status import StatusWriter
from agent.index import PULLING, READY, Index, Model
from agent.store.trees import FileEntry, Manifest
from common.kube.client import KubeClient, connect
from common.kube.informer import Informer, WatchEvent
from common.reference import parse
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import FAST
from tests.kubeapi.objects import cached_model, node
from tests.kubeapi.server import Traffic
from webhook.counts import Counts

URI = "hf://org/fleet-model@0123456789abcdef0123456789abcdef01234567"
MODEL_BYTES = 140 * 10**9
#: simulated agents per client (each client keeps at most 100 connections; a watch holds one)
PER_CLIENT = 80
PROGRESS_INTERVAL = 30.0
COUNTS_INTERVAL = 5.0


@dataclass(frozen=True)
class Figures:
    nodes: int
    #: state changes reported (each node: pulling, then ready)
    changes: int
    node_caches: Traffic
    counts: Traffic
    cached_models: Traffic
    events: Traffic
    #: the largest NodeCache and the CachedModel, as stored (JSON bytes)
    node_cache_bytes: int
    cached_model_bytes: int

    @property
    def written_per_change(self) -> float:
        total = (self.node_caches.written + self.counts.written + self.events.written)
        return total / self.changes

    @property
    def watched_per_change(self) -> float:
        return (self.node_caches.watched + self.cached_models.watched) / self.changes

    @property
    def node_cache_watched_per_change(self) -> float:
        return self.node_caches.watched / self.changes

    @property
    def cached_model_watched_per_change(self) -> float:
        return self.cached_models.watched / self.changes

    def row(self) -> str:
        return (f"{self.nodes:>6} {self.changes:>7} {self.written_per_change:>9.0f} "
                f"{self.node_cache_watched_per_change:>9.0f} "
                f"{self.cached_model_watched_per_change:>9.0f} "
                f"{self.watched_per_change:>9.0f} {self.counts.writes:>6} "
                f"{self.node_cache_bytes:>7} {self.cached_model_bytes:>7}")

    HEADER = ("nodes  changes  written/  nodecache cachedmodel watched/ counts  "
              "object bytes\n                 change  watched/  watched/   change  writes "
              "nodecache cachedmodel\n                          change    change")


class SimulatedNode:
    def __init__(self, name: str, kube: KubeClient, clock: list[float]) -> None:
        self.name = name
        self.index = Index()
        self.writer = StatusWriter(kube, name, self.index, PROGRESS_INTERVAL,
                                   clock=lambda: clock[0])
        self.informer: Informer = kube.watch_cached_models()
        self.ref = parse(URI)
        self.model: Model | None = None

    async def on_cached_model(self, event: WatchEvent) -> None:
        if event.type != "DELETED":
            meta = event.object["metadata"]
            self.writer.track(f"{meta['namespace']}/{meta['name']}", event.object,
                              self.ref.key)

    def pull(self) -> None:
        self.model = self.index.add(Model(self.ref, PULLING, bytes_total=MODEL_BYTES))

    def progress(self) -> None:
        assert self.model is not None
        self.model.bytes_done = MODEL_BYTES // 2
        self.index.notify(self.model)

    def ready(self) -> None:
        assert self.model is not None
        self.model.manifest = Manifest(self.ref.key, URI, "0123456789abcdef" * 2 + "01234567",
                                       "tree", (FileEntry("model.safetensors", MODEL_BYTES,
                                                          "0" * 64),))
        self.model.state = READY
        self.model.bytes_done = MODEL_BYTES
        self.index.notify(self.model)


async def simulate(api: FakeKubeApi, nodes: int, tmp_path: Path,
                   window: int = 60) -> Figures:
    """Roll one CachedModel out to ``nodes`` simulated nodes; what it cost."""
    c = api.cluster
    clock = [1000.0]
    owners = [c.create("nodes", node(f"node-{i:04d}")) for i in range(nodes)]
    c.create("cachedmodels", cached_model("fleet", URI), "default")
    tmp_path.mkdir(parents=True, exist_ok=True)
    kubeconfig = api.write_kubeconfig(tmp_path / "fleet.kubeconfig")
    clients = [await connect(str(kubeconfig), FAST, instance=f"client-{i}")
               for i in range(-(-nodes // PER_CLIENT) + 1)]
    fleet = [SimulatedNode(o["metadata"]["name"], clients[1 + i // PER_CLIENT], clock)
             for i, o in enumerate(owners)]
    controller = Counts(clients[0], COUNTS_INTERVAL, clock=lambda: clock[0])
    tasks = [asyncio.create_task(controller.watch())]
    tasks += [asyncio.create_task(n.informer.run(n.on_cached_model)) for n in fleet]
    try:
        async with asyncio.timeout(300):
            await asyncio.gather(controller.node_caches.synced.wait(),
                                 controller.cached_models.synced.wait(),
                                 *(n.informer.synced.wait() for n in fleet))
            await c.wait_for_watches("cachedmodels", nodes + 1)
            for n, owner in zip(fleet, owners, strict=True):
                n.writer.node_seen(owner)
                n.writer.known.set()
            await asyncio.gather(*(n.writer.load() for n in fleet))
            before = {r: api.traffic(r) for r in ("nodecaches", "cachedmodels/status",
                                                  "cachedmodels", "events")}
            for step in (SimulatedNode.pull, SimulatedNode.progress, SimulatedNode.ready):
                await _phase(api, fleet, controller, clock, step, window)
            clock[0] += COUNTS_INTERVAL  # the last counts, deferred by the interval
            await controller.flush()
            await _settle(api, fleet, controller)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    assert c.get("cachedmodels", "fleet", "default")["status"] == {
        "ready": nodes, "pulling": 0, "failed": 0}
    sizes = [len(json.dumps(o)) for o in c.objects["nodecaches.modelcache.io"].values()]
    after = {r: api.traffic(r) - before[r] for r in before}
    return Figures(
        nodes=nodes, changes=2 * nodes, node_caches=after["nodecaches"],
        counts=after["cachedmodels/status"], cached_models=after["cachedmodels"],
        events=after["events"], node_cache_bytes=max(sizes),
        cached_model_bytes=len(json.dumps(c.get("cachedmodels", "fleet", "default"))))


async def _phase(api: FakeKubeApi, fleet: list[SimulatedNode], controller: Counts,
                 clock: list[float], step: Any, window: int) -> None:
    """Each node takes ``step`` at its second of the window (spread evenly); the counts
    controller runs after each second, as its own loop would wake."""
    start = clock[0]
    slots: dict[int, list[SimulatedNode]] = {}
    for i, n in enumerate(fleet):
        slots.setdefault(i * window // len(fleet), []).append(n)
    for second in range(window):
        clock[0] = start + second
        for n in slots.get(second, []):
            step(n)
        await asyncio.gather(*(n.writer.flush() for n in slots.get(second, [])))
        await _settle(api, fleet, controller)
        await controller.flush()
    clock[0] = start + max(window, PROGRESS_INTERVAL)


async def _settle(api: FakeKubeApi, fleet: list[SimulatedNode], controller: Counts) -> None:
    """Wait until the controller has seen every NodeCache write and every node's informer
    every CachedModel write (so what the watches sent is counted)."""
    c = api.cluster
    caches = c.objects["nodecaches.modelcache.io"]

    def seen(informer: Informer, want: dict[Any, Any], key: Any) -> bool:
        got = informer.store.get(key)
        return got is not None and got["metadata"]["resourceVersion"] == \
            want["metadata"]["resourceVersion"]

    await controller.node_caches.wait_until(lambda: all(
        seen(controller.node_caches, obj, name) for (_, name), obj in caches.items()))
    model = c.objects["cachedmodels.modelcache.io"][("default", "fleet")]
    await asyncio.gather(*(n.informer.wait_until(
        lambda n=n: seen(n.informer, model, "default/fleet")) for n in fleet))
    await controller.cached_models.wait_until(
        lambda: seen(controller.cached_models, model, "default/fleet"))
