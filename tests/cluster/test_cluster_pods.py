"""Pods on the node hold the models they use (``Model.holders``), informers lose nothing
across broken watches and 410 Gone, and two agents report on one CachedModel."""

from __future__ import annotations

import asyncio

import pytest

from agent.index import READY
from common.errors import Conflict
from common.reference import parse
from tests.cluster.conftest import AgentFactory, counts, entry, eventually, node_labels
from tests.cluster.test_cluster_warm import serve_model
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model, pod
from tests.servers.agent import InProcessAgent
from tests.servers.nginx import ServedDir
from webhook.counts import Counts

CM = "cachedmodels"


def using(name: str, uri: str, node_name: str = "n1", namespace: str = "default",
          **notes: str) -> dict:
    return pod(name, node_name, namespace, annotations={"modelcache.io/model": uri, **notes})


async def test_a_pod_using_a_model_keeps_it_until_the_pod_is_gone(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    key = parse(uri).key
    c = api.cluster
    c.create(CM, cached_model("m", uri), "default")
    await eventually(agent, lambda: (m := agent.index.get(key)) is not None
                     and m.state == READY)
    c.create("pods", using("elsewhere", uri, node_name="n2"), "default")
    c.create("pods", using("user", uri), "default")
    await eventually(agent, lambda: agent.index.get(key).in_use)
    assert set(agent.index.get(key).holders) == {"pod:default/user"}
    with pytest.raises(Conflict, match="pod:default/user"):
        await agent.deps.evictor.remove(key)

    c.delete(CM, "m", "default")  # no longer wanted, still used
    c.delete("pods", "user", "default")  # terminating: its containers still run
    pods = agent.controller.pods
    async with asyncio.timeout(10):
        await c.wait_until(lambda: bool(((pods.get("default/user") or {}).get("metadata")
                                         or {}).get("deletionTimestamp")))
    assert agent.index.get(key).in_use
    c.finish_pod_deletion("user", "default")  # kubelet: containers stopped
    await eventually(agent, lambda: not agent.index.get(key).in_use)
    await agent.deps.evictor.remove(key)


async def test_finished_pods_release_and_injected_key_counts(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    ref = parse(uri, "*.bin")
    c = api.cluster
    c.create(CM, cached_model("m", uri, include=["*.bin"]), "default")
    await eventually(agent, lambda: (m := agent.index.get(ref.key)) is not None
                     and m.state == READY)
    # the webhook's record alone names the model; include changes the key
    injected = pod("job", "n1", "default", annotations={
        "modelcache.io/injected": f'{{"key":"{ref.key}","mode":"cache"}}'})
    c.create("pods", injected, "default")
    c.create("pods", using("other-key", uri), "default")  # no include: another model
    await eventually(agent, lambda: agent.index.get(ref.key).in_use)
    assert set(agent.index.get(ref.key).holders) == {"pod:default/job"}
    c.set_status("pods", "job", {"phase": "Succeeded"}, "default")
    await eventually(agent, lambda: not agent.index.get(ref.key).in_use)


async def test_a_pod_that_names_a_model_before_it_is_pulled_holds_it_once_pulled(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    key = parse(uri).key
    c = api.cluster
    c.create("pods", using("early", uri), "default")
    await c.wait_until(lambda: agent.controller.pods.get("default/early") is not None)
    c.create(CM, cached_model("m", uri), "default")
    await eventually(agent, lambda: (m := agent.index.get(key)) is not None
                     and m.state == READY)
    assert agent.index.get(key).in_use


async def test_in_use_is_known_once_the_pods_are_listed(api: FakeKubeApi, agent: InProcessAgent):
    async with asyncio.timeout(10):
        await agent.controller.usage.known.wait()
    assert agent.controller.pods.synced.is_set()


async def test_broken_watches_and_410_lose_no_change(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    first, second = serve_model(nginx_dir, "first.bin"), serve_model(nginx_dir, "second.bin")
    k1, k2 = parse(first).key, parse(second).key
    c = api.cluster
    c.create(CM, cached_model("first", first, pin=True), "default")
    c.create("pods", using("p1", first), "default")
    await eventually(agent, lambda: (m := agent.index.get(k1)) is not None
                     and m.state == READY and m.in_use and m.pinned)
    await api.wait_for_watch("pods")
    await api.wait_for_watch("cachedmodels")
    lists = (agent.controller.pod_informer.lists, agent.controller.cm_informer.lists)

    # connections reset mid-stream; everything below happens while the agent is away,
    # and the history is compacted: resuming from the last resourceVersion gets 410 Gone
    assert c.break_watches() >= 3
    c.delete("pods", "p1", "default", {"gracePeriodSeconds": 0})
    c.create("pods", using("p2", second), "default")
    c.delete(CM, "first", "default")
    c.create(CM, cached_model("second", second, pin=True), "default")
    c.compact()

    await eventually(agent, lambda: (m := agent.index.get(k2)) is not None
                     and m.state == READY and m.in_use and m.pinned)
    await eventually(agent, lambda: not agent.index.get(k1).in_use
                     and not agent.index.get(k1).pinned)
    assert agent.controller.pod_informer.lists > lists[0]  # relisted after 410
    assert agent.controller.cm_informer.lists > lists[1]


async def test_two_agents_report_one_cachedmodel_and_its_counts_add_up(
        api: FakeKubeApi, agent_factory: AgentFactory, nginx_dir: ServedDir,
        counts_controller: Counts):
    uri = serve_model(nginx_dir, size=300_000)
    label = parse(uri).node_label
    c = api.cluster
    async with agent_factory("n1"), agent_factory("n2"):
        c.create(CM, cached_model("shared", uri), "default")  # every node
        async with asyncio.timeout(15):
            await c.wait_until(lambda: entry(api, "shared", "n1").get("state") == "ready"
                               and entry(api, "shared", "n2").get("state") == "ready")
            await c.wait_until(lambda: counts(api, "shared") == (2, 0, 0))
    assert node_labels(api, "n1") == node_labels(api, "n2") == {label: "ready"}
    uid = c.get(CM, "shared", "default")["metadata"]["uid"]
    for n in ("n1", "n2"):  # each node's own object, owned by its Node
        cache = c.get("nodecaches", n)
        assert cache["metadata"]["ownerReferences"][0]["uid"] == c.get(
            "nodes", n)["metadata"]["uid"]
        assert entry(api, "shared", n)["uid"] == uid
        assert (cache["status"]["ready"], cache["status"]["bytes"]) == (1, 300_000)
    # the node goes: the garbage collector takes its NodeCache, and the counts follow
    c.delete("nodes", "n2")
    assert not c.exists("nodecaches", "n2")
    async with asyncio.timeout(10):
        await c.wait_until(lambda: counts(api, "shared") == (1, 0, 0))
