"""The small decisions of the cluster mode, each on its own: start-up delay, selectors, which
models a pod uses, the status write throttle, the usage tracker and the access memo."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cluster.controller import startup_delay
from agent.cluster.pods import models_of
from agent.cluster.status import StatusWriter, Written, due
from agent.cluster.warm import selects
from agent.eviction.usage import Usage
from agent.index import FAILED, PULLING, READY, Index, Model
from agent.pull.sharing import SharedAccess
from agent.store.trees import FileEntry, Manifest
from common.errors import Forbidden, SourceAuthError
from common.reference import parse

URI = "hf://org/model@main"


# --- start-up delay ------------------------------------------------------------------------

@given(st.text(min_size=1, max_size=63), st.floats(min_value=0.001, max_value=3600))
def test_startup_delay_is_bounded_and_stable(node: str, limit: float):
    delay = startup_delay(node, limit)
    assert 0 <= delay < limit
    assert startup_delay(node, limit) == delay


def test_startup_delay_spreads_nodes_and_can_be_off():
    delays = [startup_delay(f"node-{i}", 30.0) for i in range(1000)]
    assert len(set(delays)) == 1000
    assert sum(d < 3 for d in delays) < 150  # about a tenth in each tenth of the range
    assert sum(d > 27 for d in delays) < 150
    assert startup_delay("node-1", 0) == 0


# --- selectors and pods --------------------------------------------------------------------

def test_node_selector_matching():
    labels = {"pool": "gpu", "zone": "a"}
    assert selects(None, labels) and selects({}, labels)
    assert selects({"pool": "gpu"}, labels)
    assert not selects({"pool": "gpu", "zone": "b"}, labels)
    assert not selects({"missing": ""}, labels)


def pod_with(**notes: str) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ns", "annotations": notes}}


def test_models_of_a_pod():
    key = parse(URI).key
    assert models_of(pod_with(**{"modelcache.io/model": URI})) == {key}
    with_include = pod_with(**{"modelcache.io/model": URI,
                               "modelcache.io/include": "*.json, *.safetensors"})
    assert models_of(with_include) == {parse(URI, ["*.safetensors", "*.json"]).key}
    injected = pod_with(**{"modelcache.io/injected": '{"key": "abc", "mode": "cache"}'})
    assert models_of(injected) == {"abc"}
    for notes in ({"modelcache.io/model": "pvc://claim/x"}, {"modelcache.io/model": "nope"},
                  {"modelcache.io/injected": "not json"}, {"modelcache.io/injected": "[1]"}, {}):
        assert models_of(pod_with(**notes)) == frozenset()
    assert models_of({"metadata": {}}) == frozenset()


# --- status throttle -----------------------------------------------------------------------

def written(state: str, at: float, **more: Any) -> Written:
    return Written({"state": state, "lastTransitionTime": "t0", **more}, at)


def test_due_writes_state_changes_at_once_and_progress_at_most_every_interval():
    pulling = {"state": PULLING, "bytes": 10}
    assert due(None, pulling, 100.0, 30.0) == 100.0
    assert due(written(PULLING, 90.0, bytes=10), pulling, 100.0, 30.0) is None  # unchanged
    assert due(written(PULLING, 90.0, bytes=5), pulling, 100.0, 30.0) == 120.0  # throttled
    assert due(written(PULLING, 60.0, bytes=5), pulling, 100.0, 30.0) == 100.0
    assert due(written(PULLING, 99.0, bytes=5), {"state": READY}, 100.0, 30.0) == 100.0
    assert due(written(READY, -math.inf), {"state": READY}, 1.0, 30.0) is None
    assert due(written(READY, 99.0), {"state": READY, "revision": "r2"}, 100.0, 30.0) == 100.0
    assert due(written(READY, 0.0), None, 100.0, 30.0) is None


class RecordingKube:
    """What StatusWriter needs of common.kube, recorded."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, dict[str, Any] | None]] = []
        self.events: list[str] = []

    async def patch_cached_model_status(self, namespace: str, name: str, node: str,
                                        entry: dict[str, Any] | None) -> dict[str, Any]:
        self.writes.append((f"{namespace}/{name}", node, entry))
        return {}

    async def emit_event(self, involved: dict[str, Any], reason: str, message: str,
                         type: str = "Normal", action: str | None = None) -> bool:
        self.events.append(reason)
        return True


def manifest(key: str, size: int) -> Manifest:
    return Manifest(key, URI, "rev1", "tree", (FileEntry("f", size, "0" * 64),))


async def test_status_writer_throttles_progress_and_writes_transitions():
    clock = [1000.0]
    index, kube = Index(), RecordingKube()
    writer = StatusWriter(kube, "n1", index, interval=30.0,  # type: ignore[arg-type]
                          clock=lambda: clock[0])
    ref = parse(URI)
    cm = {"apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel",
          "metadata": {"name": "m", "namespace": "default"}}
    writer.track("default/m", cm, ref.key)
    assert await writer.flush() is None and kube.writes == []  # nothing to say yet

    model = index.add(Model(ref, PULLING, bytes_total=1000))
    assert await writer.flush() == 1030.0  # look again when progress may be written
    assert [w[2]["state"] for w in kube.writes] == ["pulling"]
    for t, done in ((1001, 100), (1010, 200), (1029, 300)):
        clock[0], model.bytes_done = t, done
        await writer.flush()
    assert len(kube.writes) == 1  # throttled
    clock[0] = 1030.0
    await writer.flush()
    assert [w[2]["bytes"] for w in kube.writes] == [0, 300]
    clock[0], model.bytes_done = 1031.0, 400
    model.state, model.manifest = READY, manifest(ref.key, 1000)
    await writer.flush()
    assert [(w[2]["state"], w[2]["bytes"]) for w in kube.writes][-1] == ("ready", 1000)
    assert kube.writes[-1][2]["revision"] == "rev1"
    assert kube.events == ["Pulled"]
    await writer.flush()
    assert len(kube.writes) == 3  # nothing changed

    writer.evicted(ref.key, "disk pressure: least recently used")
    index.remove(ref.key)
    await writer.flush()
    assert kube.writes[-1][2]["state"] == "evicted"
    assert "disk pressure" in kube.writes[-1][2]["message"]
    assert kube.events == ["Pulled", "Evicted"]

    failed = index.add(Model(ref, FAILED, error="source said no"))
    await writer.flush()
    assert kube.writes[-1][2]["state"] == "failed"
    assert kube.events[-1] == "PullFailed" and failed.error == "source said no"
    writer.untrack("default/m", clear=True)
    await writer.flush()
    assert kube.writes[-1] == ("default/m", "n1", None)  # its entry removed


async def test_progress_writes_thin_out_on_a_cachedmodel_of_many_nodes():
    """Every status write reaches every agent: with 500 nodes in the status, this node
    writes its progress every 500 s (the cluster about once a second), its states at once."""
    clock = [1000.0]
    index, kube = Index(), RecordingKube()
    writer = StatusWriter(kube, "n1", index, interval=30.0,  # type: ignore[arg-type]
                          clock=lambda: clock[0])
    others = {f"gpu-{i}": {"state": "pulling", "bytes": 0} for i in range(499)}
    cm = {"metadata": {"name": "m", "namespace": "default"}, "status": {"nodes": others}}
    assert writer.progress_interval(cm) == 499.0
    ref = parse(URI)
    writer.track("default/m", cm, ref.key)
    model = index.add(Model(ref, PULLING, bytes_total=1000))
    await writer.flush()
    cm = {**cm, "status": {"nodes": {**others, "n1": kube.writes[-1][2]}}}
    writer.track("default/m", cm, ref.key)  # the watch brings this node's own entry back
    assert writer.progress_interval(cm) == 500.0
    clock[0], model.bytes_done = 1100.0, 500
    assert await writer.flush() == 1500.0 and len(kube.writes) == 1  # not at 30 s
    clock[0] = 1500.0
    await writer.flush()
    assert [w[2]["bytes"] for w in kube.writes] == [0, 500]
    clock[0], model.state, model.manifest = 1501.0, READY, manifest(ref.key, 1000)
    await writer.flush()
    assert kube.writes[-1][2]["state"] == "ready", "a state change is written at once"
    few = {"metadata": cm["metadata"], "status": {"nodes": {"n1": {}, "n2": {}}}}
    assert writer.progress_interval(few) == 30.0


async def test_status_writer_rewrites_nothing_a_restart_finds_unchanged():
    index, kube = Index(), RecordingKube()
    writer = StatusWriter(kube, "n1", index, interval=30.0)  # type: ignore[arg-type]
    ref = parse(URI)
    model = index.add(Model(ref, READY, manifest(ref.key, 1000)))
    shown = {"state": "ready", "revision": "rev1", "bytes": 1000, "lastTransitionTime": "t"}
    writer.track("default/m", {"metadata": {"name": "m", "namespace": "default"},
                               "status": {"nodes": {"n1": shown}}}, model.key)
    await writer.flush()
    assert kube.writes == [] and kube.events == []


# --- usage ---------------------------------------------------------------------------------

async def test_usage_writes_holders_into_present_and_later_models():
    index = Index()
    usage = Usage(index, known=False)
    a, b = parse(URI), parse("hf://org/other@main")
    index.add(Model(a, READY))
    usage.set("pod:ns/p", {a.key, b.key})
    assert index.get(a.key).in_use and not usage.known.is_set()
    later = index.add(Model(b, PULLING))
    assert set(later.holders) == {"pod:ns/p"}
    usage.set("pod:ns/p", {b.key})
    assert not index.get(a.key).in_use and later.in_use
    usage.drop("pod:ns/p")
    assert not later.in_use and usage.holders_of(b.key) == frozenset()
    index.get(a.key).holders["lease:cli"] = 0.0  # another source's holder is left alone
    usage.set("pod:ns/q", {a.key})
    usage.drop("pod:ns/q")
    assert set(index.get(a.key).holders) == {"lease:cli"}


# --- the cross-namespace memo --------------------------------------------------------------

class Source:
    schemes = ("hf",)

    def __init__(self, allowed: set[str | None]) -> None:
        self.allowed = allowed
        self.asked: list[str | None] = []

    async def check_access(self, ref: Any, credentials: Any) -> None:
        token = (credentials or {}).get("token")
        self.asked.append(token)
        if token not in self.allowed:
            raise SourceAuthError("access denied (401)")


async def test_shared_access_checks_other_namespaces_once_per_ttl():
    clock = [0.0]
    sharing = SharedAccess(ttl=300, clock=lambda: clock[0])
    model = Model(parse(URI), READY, pulled_with=("team-a", "hf"))
    source = Source({"a", "c"})
    await sharing.check(model, source, "team-a", "hf", {"token": "a"})  # owner: no request
    assert source.asked == []
    with pytest.raises(Forbidden):
        await sharing.check(model, source, "team-b", "hf", {"token": "b"})
    with pytest.raises(Forbidden):
        await sharing.check(model, source, "team-b", None, None)
    await sharing.check(model, source, "team-c", "hf", {"token": "c"})
    await sharing.check(model, source, "team-c", "hf", {"token": "c"})
    assert source.asked == ["b", None, "c"]
    clock[0] = 301.0
    await sharing.check(model, source, "team-c", "hf", {"token": "c"})
    assert source.asked == ["b", None, "c", "c"]


async def test_shared_access_learns_an_unknown_pull():
    sharing = SharedAccess(ttl=300)
    public = Model(parse(URI), READY)  # found in the store at start-up
    await sharing.check(public, Source({None}), "team-x", None, None)
    assert public.pulled_with == ("team-x", None)
    assert not sharing.needs_check(public, "team-y")
    private = Model(parse("hf://org/p@main"), READY)
    await sharing.check(private, Source({"a"}), "team-a", "hf", {"token": "a"})
    assert private.pulled_with == ("team-a", "hf")
    assert sharing.needs_check(private, "team-b") and not sharing.needs_check(private, "team-a")
