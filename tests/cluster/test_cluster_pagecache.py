"""Page-cache warming in a cluster: a pending pod bound to this node (the pod watch, through
the fake apiserver) starts it; a pod that opts out, a pod in download mode, a pod that is
already running, or a pod of another node do not; an init container's ensure joins the
warming its pod's binding started."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agent.index import READY
from agent.pagecache.resident import resident_bytes
from agent.pagecache.warmer import WARMED, Warming
from common.reference import parse
from tests.cluster.conftest import eventually
from tests.cluster.test_cluster_auth import init_pod
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model, pod
from tests.servers.agent import InProcessAgent
from tests.servers.nginx import ServedDir

CM = "cachedmodels"
MiB = 1024 * 1024


class Outcomes:
    """The warmings the agent finishes, as they finish."""

    def __init__(self, agent: InProcessAgent) -> None:
        self.agent = agent
        self.queue: asyncio.Queue[Warming] = asyncio.Queue()
        agent.deps.warmer.on_done(self.queue.put_nowait)

    async def next(self, seconds: float = 20.0) -> Warming:
        async with asyncio.timeout(seconds):
            return await self.queue.get()


def serve(served: ServedDir, name: str, size: int = 12 * MiB) -> str:
    (served.path / name).write_bytes(os.urandom(size))
    return f"{served.base_url}/{name}"


def tree(agent: InProcessAgent, key: str) -> list[Path]:
    model = agent.index.get(key)
    root = agent.deps.store.models / key / model.manifest.tree
    return [root / f.path for f in model.manifest.files]


def make_cold(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert resident_bytes(f)[0] < f.stat().st_size


def skipped(agent: InProcessAgent, reason: str) -> float:
    return float(agent.deps.metrics.registry.get_sample_value(
        "modelcache_pagecache_warmings_skipped_total", {"reason": reason}) or 0)


async def prefetched(api: FakeKubeApi, agent: InProcessAgent, uri: str) -> str:
    """Pull ``uri`` through a CachedModel (a prefetch warms the disk, not the page cache)
    and drop its files from the page cache; its key."""
    key = parse(uri).key
    api.cluster.create(CM, cached_model(key[:8], uri), "default")
    await eventually(agent, lambda: (m := agent.index.get(key)) is not None
                     and m.state == READY)
    assert agent.deps.warmer.current(key) is None
    make_cold(tree(agent, key))
    return key


def using(name: str, uri: str, node_name: str = "n1", **notes: str) -> dict:
    return pod(name, node_name, "default", annotations={"modelcache.io/model": uri, **notes})


async def test_a_pod_bound_to_the_node_warms_its_model(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir) -> None:
    uri = serve(nginx_dir, "model.safetensors")
    key = await prefetched(api, agent, uri)
    outcomes = Outcomes(agent)
    c = api.cluster

    c.create("pods", using("elsewhere", uri, node_name="n2"), "default")  # not this node's
    c.create("pods", using("server-0", uri), "default")
    done = await outcomes.next()
    assert (done.key, done.trigger, done.outcome) == (key, "pod", WARMED)
    for f in tree(agent, key):
        assert resident_bytes(f)[0] == f.stat().st_size
    assert done.result.warmed_bytes >= 12 * MiB

    # the same pod starting its containers is no new binding: nothing more is read
    make_cold(tree(agent, key))
    c.set_status("pods", "server-0", {"phase": "Running"}, "default")
    pods = agent.controller.pods
    assert await pods.until(lambda: ((pods.get("default/server-0") or {}).get("status")
                                     or {}).get("phase") == "Running", 10)
    assert agent.deps.warmer.current(key) is None and outcomes.queue.empty()


async def test_pods_that_opt_out_or_download_are_not_warmed_for(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir) -> None:
    uri = serve(nginx_dir, "model.safetensors")
    key = await prefetched(api, agent, uri)
    c = api.cluster
    c.create("pods", using("no-warm", uri, **{"modelcache.io/warm-memory": "false"}),
             "default")
    c.create("pods", pod("downloads", "n1", "default", annotations={
        "modelcache.io/injected": f'{{"key":"{key}","mode":"download"}}'}), "default")
    pods = agent.controller.pods
    # the handler asks the warmer right after it puts the pod, before any waiter wakes
    assert await pods.until(lambda: skipped(agent, "opted_out") == 1
                            and skipped(agent, "download_mode") == 1, 10)
    assert agent.deps.warmer.current(key) is None
    assert all(resident_bytes(f)[0] < f.stat().st_size for f in tree(agent, key))

    # the opted-out pod's init container asks through the API: still not warmed
    token = init_pod(api, "no-warm-1", "team-a", uri, **{"modelcache.io/warm-memory": "false"})
    assert await pods.until(lambda: pods.get("team-a/no-warm-1") is not None, 10)
    status, model = await agent.call("POST", "/api/v1/models", {"uri": uri}, token=token)
    assert (status, model["state"]) == (202, "ready")
    assert skipped(agent, "opted_out") >= 2  # its binding, then its ensure
    assert agent.deps.warmer.current(key) is None


async def test_a_pod_bound_before_its_model_is_pulled_is_warmed_for_once_pulled(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir) -> None:
    uri = serve(nginx_dir, "cold.safetensors")
    key = parse(uri).key
    outcomes = Outcomes(agent)
    token = init_pod(api, "cold-0", "team-b", uri)  # bound: the pod watch asks first
    pods = agent.controller.pods
    assert await pods.until(lambda: pods.get("team-b/cold-0") is not None, 10)
    waiting = agent.deps.warmer.current(key)
    assert waiting is not None and waiting.trigger == "pod" and waiting.outcome is None

    status, model = await agent.call("POST", "/api/v1/models", {"uri": uri}, token=token)
    assert status == 202 and model["state"] == "pulling"  # its init container: joined
    assert agent.deps.warmer.current(key) is waiting
    done = await outcomes.next()
    assert done is waiting and done.outcome in (WARMED, "resident")
    for f in tree(agent, key):
        assert resident_bytes(f)[0] == f.stat().st_size
    assert outcomes.queue.empty()
