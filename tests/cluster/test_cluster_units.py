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
from common.errors import Forbidden, NotFound, SourceAuthError
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
    """What StatusWriter needs of common.kube, recorded: the NodeCache it finds, then every
    status it writes."""

    def __init__(self, found: dict[str, Any] | None = None) -> None:
        self.found = found
        self.writes: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.created: dict[str, Any] | None = None

    async def get_node_cache(self, node: str) -> dict[str, Any]:
        if self.found is None:
            raise NotFound(f"nodecache {node}")
        return self.found

    async def create_node_cache(self, node: dict[str, Any], status: dict[str, Any]
                                ) -> dict[str, Any]:
        assert not self.writes, "created once"
        self.created = node
        self.writes.append(status)
        return {}

    async def patch_node_cache(self, node: str, status: dict[str, Any]) -> dict[str, Any]:
        if self.found is None and not self.writes:
            raise NotFound(f"nodecache {node}")  # deleted under the agent
        self.writes.append(status)
        return {}

    async def emit_event(self, involved: dict[str, Any], reason: str, message: str,
                         type: str = "Normal", action: str | None = None) -> bool:
        self.events.append(reason)
        return True

    def entries(self, n: int = -1) -> list[dict[str, Any]]:
        return list(self.writes[n]["models"])


def manifest(key: str, size: int) -> Manifest:
    return Manifest(key, URI, "rev1", "tree", (FileEntry("f", size, "0" * 64),))


def cached(name: str) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel",
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"}}


async def test_status_writer_throttles_progress_and_writes_transitions():
    clock = [1000.0]
    index, kube = Index(), RecordingKube()
    writer = StatusWriter(kube, "n1", index, interval=30.0,  # type: ignore[arg-type]
                          clock=lambda: clock[0])
    await writer.load()
    ref = parse(URI)
    writer.track("default/m", cached("m"), ref.key)
    assert await writer.flush() is None and kube.writes == []  # nothing to say yet

    model = index.add(Model(ref, PULLING, bytes_total=1000))
    assert await writer.flush() == 1030.0  # look again when progress may be written
    [first] = kube.entries()
    assert (first["state"], first["uid"], first["key"]) == ("pulling", "uid-m", ref.key)
    assert (first["namespace"], first["name"]) == ("default", "m")
    for t, done in ((1001, 100), (1010, 200), (1029, 300)):
        clock[0], model.bytes_done = t, done
        await writer.flush()
    assert len(kube.writes) == 1  # throttled
    clock[0] = 1030.0
    await writer.flush()
    assert [w["models"][0]["bytes"] for w in kube.writes] == [0, 300]
    clock[0], model.bytes_done = 1031.0, 400
    model.state, model.manifest = READY, manifest(ref.key, 1000)
    await writer.flush()
    [ready] = kube.entries()
    assert (ready["state"], ready["bytes"], ready["revision"]) == ("ready", 1000, "rev1")
    assert kube.writes[-1] | {"models": []} == {"models": [], "ready": 1, "pulling": 0,
                                                 "failed": 0, "bytes": 1000}
    assert kube.events == ["Pulled"]
    await writer.flush()
    assert len(kube.writes) == 3  # nothing changed

    writer.evicted(ref.key, "disk pressure: least recently used")
    index.remove(ref.key)
    await writer.flush()
    assert kube.entries()[0]["state"] == "evicted"
    assert "disk pressure" in kube.entries()[0]["message"]
    assert kube.events == ["Pulled", "Evicted"]

    failed = index.add(Model(ref, FAILED, error="source said no"))
    await writer.flush()
    assert kube.entries()[0]["state"] == "failed" and kube.writes[-1]["failed"] == 1
    assert kube.events[-1] == "PullFailed" and failed.error == "source said no"
    writer.untrack("default/m")
    await writer.flush()
    assert kube.entries() == []  # its entry removed


async def test_one_write_carries_every_entry_and_progress_never_stretches():
    """Each node writes only its own object: a second CachedModel's entry rides along, and
    progress is written every interval however many nodes there are."""
    clock = [1000.0]
    index, kube = Index(), RecordingKube()
    writer = StatusWriter(kube, "n1", index, interval=30.0,  # type: ignore[arg-type]
                          clock=lambda: clock[0])
    await writer.load()
    a, b = parse(URI), parse("hf://org/other@main")
    writer.track("default/a", cached("a"), a.key)
    writer.track("default/b", cached("b"), b.key)
    index.add(Model(a, READY, manifest(a.key, 10)))
    index.add(Model(b, PULLING, bytes_total=1000))
    await writer.flush()
    assert [(e["name"], e["state"]) for e in kube.entries()] == [("a", "ready"),
                                                                ("b", "pulling")]
    assert len(kube.writes) == 1
    index.get(b.key).bytes_done = 500
    clock[0] = 1030.0
    await writer.flush()
    assert [e.get("bytes") for e in kube.entries()] == [10, 500] and len(kube.writes) == 2


async def test_status_writer_rewrites_nothing_a_restart_finds_unchanged():
    index = Index()
    ref = parse(URI)
    model = index.add(Model(ref, READY, manifest(ref.key, 1000)))
    shown = {"namespace": "default", "name": "m", "uid": "uid-m", "key": model.key,
             "state": "ready", "revision": "rev1", "bytes": 1000, "lastTransitionTime": "t"}
    kube = RecordingKube({"status": {"models": [shown]}})
    writer = StatusWriter(kube, "n1", index, interval=30.0)  # type: ignore[arg-type]
    await writer.load()
    writer.track("default/m", cached("m"), model.key)
    await writer.flush()
    assert kube.writes == [] and kube.events == []
    # a CachedModel deleted while the agent was away: its entry goes at the first write
    gone = {**shown, "name": "gone", "uid": "uid-gone"}
    kube = RecordingKube({"status": {"models": [shown, gone]}})
    writer = StatusWriter(kube, "n1", index, interval=30.0)  # type: ignore[arg-type]
    await writer.load()
    writer.track("default/m", cached("m"), model.key)
    await writer.flush()
    assert [e["name"] for e in kube.entries()] == ["m"] and kube.events == []
    assert kube.entries()[0]["lastTransitionTime"] == "t"


async def test_a_node_cache_deleted_under_the_agent_is_created_again():
    index = Index()
    ref = parse(URI)
    index.add(Model(ref, READY, manifest(ref.key, 1000)))
    kube = RecordingKube({"status": {"models": []}})  # found at start-up...
    writer = StatusWriter(kube, "n1", index, interval=30.0)  # type: ignore[arg-type]
    await writer.load()
    kube.found = None  # ...then deleted by an admin
    owner = {"metadata": {"name": "n1", "uid": "uid-n1"}}
    writer.node_seen(owner)
    writer.track("default/m", cached("m"), ref.key)
    await writer.flush()
    assert kube.created == owner and [e["state"] for e in kube.entries()] == ["ready"]


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
