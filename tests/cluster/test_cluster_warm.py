"""CachedModels drive what a node keeps warm: pulled from a real nginx, labelled, reported in
the node's NodeCache with Events (and counted in the CachedModel's status by the counts
controller), pinned or not, and let go when they stop applying."""

from __future__ import annotations

import asyncio

from agent.index import READY
from agent.settings import WarmModel
from common.reference import parse
from tests.cluster.conftest import counts, entry, eventually, node_labels, reasons
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model
from tests.servers.agent import InProcessAgent
from tests.servers.nginx import ServedDir
from webhook.counts import Counts

CM = "cachedmodels"


def serve_model(served: ServedDir, name: str = "model.bin", size: int = 10_000) -> str:
    (served.path / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return f"{served.base_url}/{name}"


async def test_cachedmodel_is_pulled_labelled_and_reported(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir,
        counts_controller: Counts):
    uri = serve_model(nginx_dir)
    ref = parse(uri)
    c = api.cluster
    c.create(CM, cached_model("m", uri, nodeSelector={"pool": "gpu"}, pin=True), "default")
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "m", "n1").get("state") == "ready")
        await c.wait_until(lambda: ref.node_label in node_labels(api, "n1"))
        # the counts controller sums the NodeCaches into the CachedModel's status
        await c.wait_until(lambda: counts(api, "m") == (1, 0, 0))

    model = agent.index.get(ref.key)
    assert model.state == READY and model.pinned
    got = entry(api, "m", "n1")
    assert got["bytes"] == 10_000
    assert got["revision"] == model.manifest.revision
    assert got["lastTransitionTime"].endswith("Z") and "message" not in got
    assert (got["key"], got["uid"]) == (ref.key, c.get(CM, "m", "default")["metadata"]["uid"])
    assert set(c.get(CM, "m", "default")["status"]) == {"ready", "pulling", "failed"}
    assert node_labels(api, "n1") == {ref.node_label: "ready"}
    assert node_labels(api, "n2") == {}  # only this agent's own node
    assert c.get("nodes", "n1")["metadata"]["labels"]["pool"] == "gpu"  # others untouched
    await c.wait_until(lambda: "Pulled" in reasons(api, "m"))


async def test_a_selector_that_does_not_match_is_ignored_until_the_node_matches(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    here, there = serve_model(nginx_dir, "here.bin"), serve_model(nginx_dir, "there.bin")
    c = api.cluster
    c.create(CM, cached_model("cpu-only", there, nodeSelector={"pool": "cpu"}), "default")
    c.create(CM, cached_model("gpu", here, nodeSelector={"pool": "gpu"}), "default")
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "gpu", "n1").get("state") == "ready")
    assert agent.index.get(parse(there).key) is None
    assert entry(api, "cpu-only", "n1") == {}

    # the node's labels change: now it matches, and no longer matches the other one
    labels = {**c.get("nodes", "n1")["metadata"]["labels"], "pool": "cpu"}
    c.patch("nodes", "n1", {"metadata": {"labels": labels}})
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "cpu-only", "n1").get("state") == "ready")
        await c.wait_until(lambda: entry(api, "gpu", "n1") == {})  # its entry is removed
    # the model it no longer wants stays (evictable), it is not deleted
    assert agent.index.get(parse(here).key).state == READY


async def test_deleted_cachedmodel_leaves_its_model_unpinned_and_evictable(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    key = parse(uri).key
    c = api.cluster
    c.create(CM, cached_model("m", uri, pin=True), "default")
    await eventually(agent, lambda: (m := agent.index.get(key)) is not None
                     and m.state == READY and m.pinned)

    c.delete(CM, "m", "default")
    await eventually(agent, lambda: not agent.index.get(key).pinned)
    model = agent.index.get(key)
    assert model.state == READY and not model.in_use  # still here: evictable, not evicted
    assert (agent.deps.store.root / "models" / key / "manifest.json").exists()
    await agent.deps.evictor.remove(key)  # no Conflict: nothing holds it


async def test_two_cachedmodels_one_model_pinned_while_any_pins(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    key = parse(uri).key
    c = api.cluster
    c.create(CM, cached_model("pinning", uri, pin=True), "default")
    c.create(CM, cached_model("plain", uri), "default")
    await eventually(agent, lambda: (m := agent.index.get(key)) is not None and m.pinned)
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "plain", "n1").get("state") == "ready"
                           and entry(api, "pinning", "n1").get("state") == "ready")
    c.patch(CM, "pinning", {"spec": {"pin": False}}, "default")
    await eventually(agent, lambda: not agent.index.get(key).pinned)


async def test_pins_of_an_earlier_run_go_but_the_config_files_stay(
        api: FakeKubeApi, agent_factory, nginx_dir: ServedDir):
    kept, fixed = serve_model(nginx_dir, "kept.bin"), serve_model(nginx_dir, "fixed.bin")
    orphan = serve_model(nginx_dir, "orphan.bin")
    c = api.cluster
    c.create(CM, cached_model("kept", kept, pin=True), "default")
    c.create(CM, cached_model("orphan", orphan, pin=True), "default")
    async with agent_factory("n1", warm=(WarmModel(fixed, pin=True),)) as first:
        await eventually(first, lambda: all(
            (m := first.index.get(parse(u).key)) is not None and m.state == READY
            and m.pinned for u in (kept, fixed, orphan)))
        # a pin asked of the API after start-up is not undone by the CachedModels
        late = await first.deps.puller.ensure(parse(serve_model(nginx_dir, "late.bin")),
                                              pin=True)
        await eventually(first, lambda: late.state == READY)
        assert late.pinned
    c.delete(CM, "orphan", "default")  # while the agent is away
    async with agent_factory("n1", warm=(WarmModel(fixed, pin=True),)) as agent:
        await eventually(agent, lambda: not agent.index.get(parse(orphan).key).pinned)
        assert agent.index.get(parse(kept).key).pinned
        assert agent.index.get(parse(fixed).key).pinned  # the config file's
        assert not agent.index.get(late.key).pinned  # an earlier run's API pin


async def test_invalid_uri_and_missing_secret_are_reported_failed(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir,
        counts_controller: Counts):
    uri = serve_model(nginx_dir)
    c = api.cluster
    c.create(CM, cached_model("bad", "hf://not a repo"), "default")
    c.create(CM, cached_model("nosecret", uri, credentialsSecret="absent"), "default")
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "bad", "n1").get("state") == "failed")
        await c.wait_until(lambda: entry(api, "nosecret", "n1").get("state") == "failed")
    assert "spec.uri" in entry(api, "bad", "n1")["message"]
    assert "absent" in entry(api, "nosecret", "n1")["message"]
    await c.wait_until(lambda: "PullFailed" in reasons(api, "nosecret"))
    async with asyncio.timeout(10):
        await c.wait_until(lambda: counts(api, "nosecret") == (0, 0, 1))


async def test_labels_follow_readiness_and_stale_ones_go_at_start(
        api: FakeKubeApi, agent_factory, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    ref = parse(uri)
    c = api.cluster
    stale = "modelcache.io/m-0123456789abcdef"
    c.patch("nodes", "n1", {"metadata": {"labels": {stale: "ready"}}})
    c.create(CM, cached_model("m", uri), "default")
    async with agent_factory("n1") as agent:
        async with asyncio.timeout(10):
            await c.wait_until(lambda: node_labels(api, "n1") == {ref.node_label: "ready"})
        await agent.deps.evictor.remove(ref.key)  # evicted: the label goes
        async with asyncio.timeout(10):
            await c.wait_until(lambda: node_labels(api, "n1") == {})
            await c.wait_until(lambda: entry(api, "m", "n1").get("state") == "evicted")
        await c.wait_until(lambda: "Evicted" in reasons(api, "m"))
    # graceful shutdown keeps the labels of what is on disk (see agent/nodelabels.py)
    assert c.get("nodes", "n1")["metadata"]["labels"]["pool"] == "gpu"


async def test_a_node_event_on_disk_pressure(api: FakeKubeApi, agent: InProcessAgent):
    await agent.controller.pressure("store 91% used, above the high watermark 80%")
    [event] = api.cluster.events("n1")
    assert (event["reason"], event["type"]) == ("DiskPressure", "Warning")
    assert event["involvedObject"]["kind"] == "Node"


async def test_watermark_eviction_is_reported_on_the_cachedmodel_and_the_node(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    """The real evictor, wired to the controller: a sweep forced by the watermarks evicts
    an unpinned model; its status and Event say why, and the Node gets a pressure Event."""
    uri = serve_model(nginx_dir)
    ref = parse(uri)
    c = api.cluster
    c.create(CM, cached_model("m", uri), "default")
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "m", "n1").get("state") == "ready")
    evictor = agent.deps.evictor
    evictor.set_limits(high=0.001, low=0.0005)  # whatever the disk holds is above them
    assert await evictor.check() > 0
    assert agent.index.get(ref.key) is None
    async with asyncio.timeout(10):
        await c.wait_until(lambda: entry(api, "m", "n1").get("state") == "evicted")
        await c.wait_until(lambda: node_labels(api, "n1") == {})
        await c.wait_until(lambda: "Evicted" in reasons(api, "m"))
    assert "watermark" in entry(api, "m", "n1")["message"]
    [pressure] = [e for e in api.cluster.events("n1") if e["reason"] == "DiskPressure"]
    assert "over its limits" in pressure["message"] and pressure["type"] == "Warning"


async def test_node_and_cachedmodel_informers_start_from_nothing(api: FakeKubeApi,
                                                                   agent: InProcessAgent):
    """Sanity: a node without CachedModels writes nothing at all."""
    await api.wait_for_watch("cachedmodels")
    await api.wait_for_watch("pods")
    await api.wait_for_watch("nodes")
    await agent.controller.started.wait()
    assert api.count("patch") == 0
