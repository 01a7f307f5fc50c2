"""The fake apiserver, driven by the real kubernetes_asyncio client, answers as a real one.

Each test states the behaviour of kube-apiserver it checks (reads, selectors, watches and
their failure modes, writes and their conflicts, patches of each content type, reviews).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model, node, pod

G, V, P = "modelcache.io", "v1alpha1", "cachedmodels"


def status_of(e: ApiException) -> dict:
    return json.loads(e.body)


async def collect(stream: k8s_watch.Watch, count: int) -> list[dict]:
    out = []
    async for event in stream:
        out.append(event)
        if len(out) == count:
            break
    return out


# --- reads and selectors ---------------------------------------------------------------------


async def test_list_has_resource_version_and_typed_items(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.create("pods", pod("a", "n1"), "default")
    v1 = k8s.CoreV1Api(raw)
    pods = await v1.list_namespaced_pod("default")
    assert pods.kind == "PodList" and pods.api_version == "v1"
    assert int(pods.metadata.resource_version) == api.cluster.rv
    assert [p.metadata.name for p in pods.items] == ["a"]
    assert pods.items[0].status.phase == "Pending"  # set by the server on create
    # as on a real server, items of a built-in list carry no kind/apiVersion
    resp = await v1.list_namespaced_pod("default", _preload_content=False)
    body = json.loads(await resp.read())
    assert "kind" not in body["items"][0] and body["kind"] == "PodList"
    # custom resources' items do
    api.cluster.create(P, cached_model("m"), "default")
    cms = await k8s.CustomObjectsApi(raw).list_namespaced_custom_object(G, V, "default", P)
    assert cms["kind"] == "CachedModelList" and cms["items"][0]["kind"] == "CachedModel"


async def test_label_selectors(api: FakeKubeApi, raw: k8s.ApiClient):
    for name, labels in [("a", {"app": "x", "tier": "web"}), ("b", {"app": "y"}), ("c", {})]:
        api.cluster.create("pods", pod(name, labels=labels), "default")
    v1 = k8s.CoreV1Api(raw)

    async def names(selector: str) -> list[str]:
        got = await v1.list_namespaced_pod("default", label_selector=selector)
        return [p.metadata.name for p in got.items]

    assert await names("app=x") == ["a"]
    assert await names("app==x") == ["a"]
    assert await names("app!=x") == ["b", "c"]  # != also matches pods without the key
    assert await names("app in (x,y)") == ["a", "b"]
    assert await names("app notin (x)") == ["b", "c"]
    assert await names("app") == ["a", "b"]
    assert await names("!app") == ["c"]
    assert await names("app=x,tier=web") == ["a"]
    assert await names("app=x,tier=db") == []
    with pytest.raises(ApiException) as e:
        await names("app in x")
    assert e.value.status == 400 and status_of(e.value)["reason"] == "BadRequest"


async def test_field_selectors(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.create("namespaces", {"metadata": {"name": "other"}})
    api.cluster.create("pods", pod("a", "n1"), "default")
    api.cluster.create("pods", pod("b", "n2"), "default")
    api.cluster.create("pods", pod("c", "n1", namespace="other"), "other")
    api.cluster.create("pods", pod("d"), "default")
    api.cluster.set_status("pods", "a", {"phase": "Running"}, "default")
    v1 = k8s.CoreV1Api(raw)

    async def names(selector: str) -> list[str]:
        got = await v1.list_pod_for_all_namespaces(field_selector=selector)
        return sorted(p.metadata.name for p in got.items)

    assert await names("spec.nodeName=n1") == ["a", "c"]
    assert await names("spec.nodeName=") == ["d"]  # unscheduled pods
    assert await names("spec.nodeName!=n1") == ["b", "d"]
    assert await names("status.phase=Running") == ["a"]
    assert await names("metadata.namespace=other") == ["c"]
    assert await names("metadata.name=b") == ["b"]
    assert await names("spec.nodeName=n1,metadata.namespace=default") == ["a"]
    with pytest.raises(ApiException) as e:
        await names("spec.image=busybox")
    assert e.value.status == 400
    assert status_of(e.value)["message"] == "field label not supported: spec.image"


async def test_paginated_list_is_a_consistent_snapshot(api: FakeKubeApi, raw: k8s.ApiClient):
    for i in range(5):
        api.cluster.create("pods", pod(f"p{i}"), "default")
    v1 = k8s.CoreV1Api(raw)
    first = await v1.list_namespaced_pod("default", limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3 and first.metadata._continue
    # changes after the first page do not show in the following pages
    api.cluster.delete("pods", "p3", "default")
    api.cluster.create("pods", pod("p9"), "default")
    rest = await v1.list_namespaced_pod("default", limit=10, _continue=first.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["p2", "p3", "p4"]
    assert rest.metadata.resource_version == first.metadata.resource_version
    # once the snapshot is compacted away, the continue token has expired
    api.cluster.compact()
    with pytest.raises(ApiException) as e:
        await v1.list_namespaced_pod("default", limit=1, _continue=first.metadata._continue)
    assert e.value.status == 410 and status_of(e.value)["reason"] == "Expired"


async def test_errors_are_status_objects(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    with pytest.raises(ApiException) as e:
        await v1.read_namespaced_pod("nope", "default")
    assert e.value.status == 404
    assert status_of(e.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"}, "code": 404,
    }
    with pytest.raises(ApiException) as e:
        await k8s.CustomObjectsApi(raw).get_namespaced_custom_object(G, V, "default", P, "x")
    assert status_of(e.value)["message"] == 'cachedmodels.modelcache.io "x" not found'
    assert status_of(e.value)["details"]["group"] == G
    with pytest.raises(ApiException) as e:
        await v1.create_namespaced_pod("missing", pod("a", namespace="missing"))
    assert e.value.status == 404
    assert status_of(e.value)["message"] == 'namespaces "missing" not found'


async def test_unknown_token_is_401(api: FakeKubeApi, tmp_path: Path):
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(api.write_kubeconfig(tmp_path / "kc", token="stolen")),
        client_configuration=cfg, persist_config=False,
    )
    async with k8s.ApiClient(cfg) as client:
        with pytest.raises(ApiException) as e:
            await k8s.CoreV1Api(client).list_node()
    assert e.value.status == 401 and status_of(e.value)["reason"] == "Unauthorized"
    assert api.count("list", "nodes") == 1


async def test_rbac_enforced_is_403(api: FakeKubeApi, tmp_path: Path):
    api.enforce_rbac = True
    api.auth.add_token("viewer", "jane")
    api.auth.allow(users=["jane"], verbs=["get", "list"], resources=["pods"],
                   namespace="default")
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(api.write_kubeconfig(tmp_path / "kc", token="viewer")),
        client_configuration=cfg, persist_config=False,
    )
    async with k8s.ApiClient(cfg) as client:
        v1 = k8s.CoreV1Api(client)
        await v1.list_namespaced_pod("default")
        with pytest.raises(ApiException) as e:
            await v1.list_namespaced_pod("kube-system")
        assert e.value.status == 403
        assert status_of(e.value)["message"] == (
            'pods is forbidden: User "jane" cannot list resource "pods" in API group "" in '
            'the namespace "kube-system"'
        )
        with pytest.raises(ApiException) as e:
            await v1.delete_namespaced_pod("x", "default")
        assert e.value.status == 403


# --- watches -----------------------------------------------------------------------------


async def test_watch_without_resource_version_starts_with_current_state(
    api: FakeKubeApi, raw: k8s.ApiClient
):
    api.cluster.create("pods", pod("old", "n1"), "default")
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1",
                          timeout_seconds=5)
        first = await collect(stream, 1)
        assert (first[0]["type"], first[0]["object"].metadata.name) == ("ADDED", "old")
        api.cluster.create("pods", pod("new", "n1"), "default")
        api.cluster.create("pods", pod("elsewhere", "n2"), "default")
        api.cluster.delete("pods", "old", "default", {"gracePeriodSeconds": 0})
        events = await collect(stream, 2)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "new"), ("DELETED", "old")]
    # the DELETED object carries the resourceVersion of the deletion
    assert int(events[1]["object"].metadata.resource_version) == api.cluster.rv


async def test_watch_from_resource_version_replays_and_follows_selectors(
    api: FakeKubeApi, raw: k8s.ApiClient
):
    api.cluster.create("pods", pod("a"), "default")
    since = str(api.cluster.rv)
    api.cluster.create("pods", pod("b", labels={"use": "yes"}), "default")
    # "a" starts matching the selector (ADDED for this watch), "b" stops (DELETED)
    api.cluster.patch("pods", "a", {"metadata": {"labels": {"use": "yes"}}}, "default")
    api.cluster.patch("pods", "b", {"metadata": {"labels": {"use": None}}}, "default")
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_namespaced_pod, "default", label_selector="use=yes",
                          resource_version=since, timeout_seconds=5)
        events = await collect(stream, 3)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "b"), ("ADDED", "a"), ("DELETED", "b")]
    # leaving the selection shows the object as it was, at the version of the change
    assert events[2]["object"].metadata.labels == {"use": "yes"}
    assert events[2]["object"].metadata.resource_version == str(api.cluster.rv)


@pytest.mark.slow
async def test_watch_ends_at_timeout_seconds(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with k8s_watch.Watch() as w:
        events = [e async for e in w.stream(v1.list_node, timeout_seconds=1)]
    assert events == []
    assert 0.9 <= loop.time() - started < 3


async def test_bookmarks_carry_the_current_resource_version(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1",
                          allow_watch_bookmarks=True, resource_version=str(api.cluster.rv),
                          timeout_seconds=5)
        task = asyncio.ensure_future(collect(stream, 1))  # the request is sent on iteration
        await api.cluster.wait_for_watches("pods")
        api.cluster.create("nodes", node("unrelated"))  # moves the resourceVersion only
        api.cluster.send_bookmarks()
        [event] = await task
    assert event["type"] == "BOOKMARK"
    assert event["raw_object"] == {"kind": "Pod", "apiVersion": "v1",
                                   "metadata": {"resourceVersion": str(api.cluster.rv)}}
    assert w.resource_version == str(api.cluster.rv)


@pytest.mark.slow
async def test_bookmark_sent_before_a_watch_times_out(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        events = [e async for e in w.stream(v1.list_node, allow_watch_bookmarks=True,
                                            resource_version=str(api.cluster.rv),
                                            timeout_seconds=1)]
    assert [e["type"] for e in events] == ["BOOKMARK"]


async def test_streaming_list_ends_initial_events_with_a_bookmark(
    api: FakeKubeApi, raw: k8s.ApiClient
):
    api.cluster.create("nodes", node("n1"))
    api.cluster.create("nodes", node("n2"))
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_node, send_initial_events=True, allow_watch_bookmarks=True,
                          resource_version_match="NotOlderThan", timeout_seconds=5)
        events = await collect(stream, 3)
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    assert events[2]["raw_object"]["metadata"] == {
        "resourceVersion": str(api.cluster.rv),
        "annotations": {"k8s.io/initial-events-end": "true"}}


async def test_too_old_resource_version_is_410_in_the_stream(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.create("pods", pod("a"), "default")
    old = str(api.cluster.rv)
    api.cluster.create("pods", pod("b"), "default")
    api.cluster.compact()
    v1 = k8s.CoreV1Api(raw)
    # on the wire: HTTP 200, then one ERROR event holding a 410 Status, then the end
    resp = await v1.list_namespaced_pod("default", watch=True, resource_version=old,
                                        _preload_content=False)
    assert resp.status == 200
    lines = (await resp.read()).splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"] == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {old} ({api.cluster.rv + 1})",
        "reason": "Expired", "code": 410,
    }
    # which kubernetes_asyncio's Watch turns into an ApiException(410)
    async with k8s_watch.Watch() as w:
        with pytest.raises(ApiException) as e:
            await collect(w.stream(v1.list_namespaced_pod, "default", resource_version=old,
                                   timeout_seconds=5), 1)
    assert e.value.status == 410


@pytest.mark.slow
async def test_expire_next_watch_hook(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.expire_next_watch()
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        with pytest.raises(ApiException) as e:
            await collect(w.stream(v1.list_node, resource_version=str(api.cluster.rv),
                                   timeout_seconds=5), 1)
    assert e.value.status == 410
    async with k8s_watch.Watch() as w:  # only the next one
        assert [e async for e in w.stream(v1.list_node, resource_version=str(api.cluster.rv),
                                          timeout_seconds=1)] == []


async def test_expire_watches_hook(api: FakeKubeApi, raw: k8s.ApiClient):
    """An open watch ends with the 410 ERROR event a compaction under it causes; a write
    after it is not sent on that stream, and a watch from the old version gets 410 too."""
    v1 = k8s.CoreV1Api(raw)
    since = str(api.cluster.rv)
    api.cluster.create("namespaces", {"metadata": {"name": "before"}})
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_namespace, resource_version=since, timeout_seconds=30)
        task = asyncio.ensure_future(collect(stream, 2))  # "before", then the 410
        await api.cluster.wait_for_watches("namespaces")
        assert api.cluster.expire_watches("namespaces") == 1
        api.cluster.create("namespaces", {"metadata": {"name": "after"}})
        with pytest.raises(ApiException) as e:
            await task
    assert e.value.status == 410
    async with k8s_watch.Watch() as w:
        with pytest.raises(ApiException) as e:
            await collect(w.stream(v1.list_namespace, resource_version=since,
                                   timeout_seconds=5), 1)
    assert e.value.status == 410
    names = [n.metadata.name for n in (await v1.list_namespace()).items]
    assert "after" in names  # only a list brings it


async def test_broken_stream_is_an_incomplete_response(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_node, resource_version=str(api.cluster.rv), timeout_seconds=30)
        task = asyncio.ensure_future(collect(stream, 1))
        await api.cluster.wait_for_watches("nodes")
        api.cluster.create("nodes", node("n1"))
        assert [e["type"] for e in await task] == ["ADDED"]
        assert api.cluster.break_watches("nodes") == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await collect(stream, 1)
    assert api.cluster.watches == []


async def test_clean_break_ends_the_stream(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    async with k8s_watch.Watch() as w:
        stream = w.stream(v1.list_node, resource_version=str(api.cluster.rv), timeout_seconds=30)
        task = asyncio.ensure_future(collect(stream, 5))
        await api.cluster.wait_for_watches("nodes")
        api.cluster.break_watches(clean=True)
        assert await task == []


# --- writes ------------------------------------------------------------------------------


async def test_create_conflicts_and_replace(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    created = await v1.create_node(node("n1"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    with pytest.raises(ApiException) as e:
        await v1.create_node(node("n1"))
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    assert status_of(e.value)["message"] == 'nodes "n1" already exists'

    stale = await v1.read_node("n1")
    fresh = await v1.read_node("n1")
    fresh.metadata.labels["zone"] = "a"
    updated = await v1.replace_node("n1", fresh)
    assert int(updated.metadata.resource_version) > int(stale.metadata.resource_version)
    stale.metadata.labels["zone"] = "b"
    with pytest.raises(ApiException) as e:
        await v1.replace_node("n1", stale)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"
    assert status_of(e.value)["message"] == (
        'Operation cannot be fulfilled on nodes "n1": the object has been modified; please '
        "apply your changes to the latest version and try again")
    # an update that changes nothing is not a write: same resourceVersion, no event
    again = await v1.replace_node("n1", updated)
    assert again.metadata.resource_version == updated.metadata.resource_version
    with pytest.raises(ApiException) as e:
        await v1.replace_node("ghost", node("ghost"))
    assert e.value.status == 404


async def test_generate_name(api: FakeKubeApi, raw: k8s.ApiClient):
    body = pod("")
    body["metadata"] = {"generateName": "worker-"}
    created = await k8s.CoreV1Api(raw).create_namespaced_pod("default", body)
    assert created.metadata.name.startswith("worker-") and len(created.metadata.name) == 12


async def test_patch_content_types_on_a_node(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.create("nodes", node("n1", {"keep": "me", "modelcache.io/m-aa": "ready"}))
    v1 = k8s.CoreV1Api(raw)
    # merge patch (chosen with _content_type): null removes a key, others are untouched
    out = await v1.patch_node("n1", {"metadata": {"labels": {
        "modelcache.io/m-aa": None, "modelcache.io/m-bb": "ready"}}},
        _content_type="application/merge-patch+json")
    assert out.metadata.labels == {"kubernetes.io/hostname": "n1", "keep": "me",
                                   "modelcache.io/m-bb": "ready"}
    # JSON patch (chosen by kubernetes_asyncio for a list body)
    out = await v1.patch_node("n1", [
        {"op": "test", "path": "/metadata/labels/keep", "value": "me"},
        {"op": "remove", "path": "/metadata/labels/modelcache.io~1m-bb"}])
    assert "modelcache.io/m-bb" not in out.metadata.labels
    assert api.requests[-1].content_type == "application/json-patch+json"
    with pytest.raises(ApiException) as e:
        await v1.patch_node("n1", [{"op": "test", "path": "/metadata/labels/keep",
                                    "value": "other"}])
    assert e.value.status == 422
    # strategic merge patch (chosen for a dict body on built-in types)
    out = await v1.patch_node("n1", {"metadata": {"labels": {"x": "1"}},
                                     "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}})
    assert api.requests[-1].content_type == "application/strategic-merge-patch+json"
    assert out.metadata.labels["x"] == "1" and out.metadata.labels["keep"] == "me"
    out = await v1.patch_node("n1", {"spec": {"taints": [{"key": "j", "effect": "NoExecute"}]}})
    assert [t.key for t in out.spec.taints] == ["k", "j"]  # merged by key, not replaced


async def test_patch_with_stale_resource_version_conflicts(api: FakeKubeApi, raw: k8s.ApiClient):
    api.cluster.create("nodes", node("n1"))
    v1 = k8s.CoreV1Api(raw)
    rv = (await v1.read_node("n1")).metadata.resource_version
    await v1.patch_node("n1", {"metadata": {"resourceVersion": rv, "labels": {"a": "1"}}},
                        _content_type="application/merge-patch+json")
    with pytest.raises(ApiException) as e:
        await v1.patch_node("n1", {"metadata": {"resourceVersion": rv, "labels": {"a": "2"}}},
                            _content_type="application/merge-patch+json")
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"


async def test_custom_resource_patches_and_status_subresource(
    api: FakeKubeApi, raw: k8s.ApiClient
):
    custom = k8s.CustomObjectsApi(raw)
    created = await custom.create_namespaced_custom_object(
        G, V, "default", P, cached_model("m", status={"ignored": True}))
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["pin"] is False  # defaulted from the CRD schema
    assert "status" not in created  # status is only written through /status
    merge = "application/merge-patch+json"
    # the status subresource changes status and nothing else
    out = await custom.patch_namespaced_custom_object_status(
        G, V, "default", P, "m", {"spec": {"pin": True}, "status": {"pulling": 1}},
        _content_type=merge)
    assert out["spec"]["pin"] is False and out["status"] == {"pulling": 1}
    assert out["metadata"]["generation"] == 1
    out = await custom.patch_namespaced_custom_object_status(
        G, V, "default", P, "m", {"status": {"ready": 2, "nodes": {"n1": {}}}},
        _content_type=merge)
    assert out["status"] == {"pulling": 1, "ready": 2}  # merged; unknown fields pruned
    # the main resource changes spec, not status; a spec change bumps generation
    out = await custom.patch_namespaced_custom_object(
        G, V, "default", P, "m", {"spec": {"pin": True}, "status": {"ready": None}},
        _content_type=merge)
    assert out["spec"]["pin"] is True and out["status"] == {"pulling": 1, "ready": 2}
    assert out["metadata"]["generation"] == 2
    # JSON patch works on custom resources too
    out = await custom.patch_namespaced_custom_object_status(
        G, V, "default", P, "m", [{"op": "remove", "path": "/status/pulling"}])
    assert out["status"] == {"ready": 2}
    # strategic merge patch does not: 415
    with pytest.raises(ApiException) as e:
        await custom.patch_namespaced_custom_object(
            G, V, "default", P, "m", {"spec": {"pin": False}},
            _content_type="application/strategic-merge-patch+json")
    assert e.value.status == 415 and status_of(e.value)["reason"] == "UnsupportedMediaType"
    # kubernetes_asyncio's quirk: a dict body without _content_type is sent as a JSON patch,
    # which the server cannot decode
    with pytest.raises(ApiException) as e:
        await custom.patch_namespaced_custom_object(G, V, "default", P, "m",
                                                    {"spec": {"pin": False}})
    assert e.value.status == 400
    assert api.requests[-1].content_type == "application/json-patch+json"


async def test_custom_resource_validated_against_crd_schema(api: FakeKubeApi, raw: k8s.ApiClient):
    custom = k8s.CustomObjectsApi(raw)
    bad = cached_model("m", uri="ftp://nope")
    bad["spec"]["pin"] = "yes"
    bad["spec"]["unknownField"] = 1
    with pytest.raises(ApiException) as e:
        await custom.create_namespaced_custom_object(G, V, "default", P, bad)
    st = status_of(e.value)
    assert e.value.status == 422 and st["reason"] == "Invalid"
    assert {c["field"] for c in st["details"]["causes"]} == {"spec.uri", "spec.pin"}
    assert st["message"].startswith('CachedModel.modelcache.io "m" is invalid: ')
    ok = cached_model("m")
    ok["spec"]["unknownField"] = 1
    created = await custom.create_namespaced_custom_object(G, V, "default", P, ok)
    assert "unknownField" not in created["spec"]  # pruned, as structural schemas do
    with pytest.raises(ApiException) as e:
        await custom.patch_namespaced_custom_object_status(
            G, V, "default", P, "m", {"status": {"ready": -1}},
            _content_type="application/merge-patch+json")
    assert e.value.status == 422


async def test_delete_answers_and_graceful_pods(api: FakeKubeApi, raw: k8s.ApiClient):
    custom, v1 = k8s.CustomObjectsApi(raw), k8s.CoreV1Api(raw)
    created = await custom.create_namespaced_custom_object(G, V, "default", P, cached_model("m"))
    gone = await custom.delete_namespaced_custom_object(G, V, "default", P, "m")
    assert gone == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": "m", "group": G, "kind": P,
                                "uid": created["metadata"]["uid"]}}
    # an unscheduled pod goes at once; the answer is the pod
    api.cluster.create("pods", pod("idle"), "default")
    answer = await v1.delete_namespaced_pod("idle", "default")
    assert answer.kind == "Pod" and not api.cluster.exists("pods", "idle", "default")
    # a pod on a node terminates gracefully: marked, then removed when the kubelet is done
    api.cluster.create("pods", pod("busy", "n1"), "default")
    marked = await v1.delete_namespaced_pod("busy", "default")
    assert marked.metadata.deletion_timestamp is not None
    assert marked.metadata.deletion_grace_period_seconds == 30
    assert api.cluster.exists("pods", "busy", "default")
    api.cluster.finish_pod_deletion("busy", "default")
    assert not api.cluster.exists("pods", "busy", "default")
    # preconditions
    api.cluster.create("nodes", node("n1"))
    with pytest.raises(ApiException) as e:
        await v1.delete_node("n1", body={"preconditions": {"resourceVersion": "1"}})
    assert e.value.status == 409


async def test_delete_collection(api: FakeKubeApi, raw: k8s.ApiClient):
    for name, app in [("a", "x"), ("b", "x"), ("c", "y")]:
        api.cluster.create("pods", pod(name, labels={"app": app}), "default")
    resp = await k8s.CoreV1Api(raw).delete_collection_namespaced_pod(
        "default", label_selector="app=x", _preload_content=False)
    body = json.loads(await resp.read())
    assert body["kind"] == "PodList" and [p["metadata"]["name"] for p in body["items"]] == [
        "a", "b"]
    assert [p["metadata"]["name"] for p in api.cluster.list("pods", "default")["items"]] == ["c"]


async def test_finalizers_defer_deletion(api: FakeKubeApi, raw: k8s.ApiClient):
    custom = k8s.CustomObjectsApi(raw)
    body = cached_model("m")
    body["metadata"]["finalizers"] = ["modelcache.io/cleanup"]
    await custom.create_namespaced_custom_object(G, V, "default", P, body)
    marked = await custom.delete_namespaced_custom_object(G, V, "default", P, "m")
    assert marked["metadata"]["deletionTimestamp"]
    await custom.patch_namespaced_custom_object(
        G, V, "default", P, "m", {"metadata": {"finalizers": None}},
        _content_type="application/merge-patch+json")
    assert not api.cluster.exists(P, "m", "default")


# --- events, reviews ---------------------------------------------------------------------


async def test_events_k8s_io_is_the_same_object_as_core_events(
    api: FakeKubeApi, raw: k8s.ApiClient
):
    events = k8s.EventsV1Api(raw)
    body = {
        "metadata": {"name": "m.1", "namespace": "default"},
        "eventTime": "2025-01-01T00:00:00.000000Z", "reportingController": "modelcache.io/agent",
        "reportingInstance": "n1", "action": "Pull", "reason": "Pulled", "note": "done",
        "type": "Normal", "regarding": {"kind": "CachedModel", "name": "m",
                                        "namespace": "default"},
    }
    created = await events.create_namespaced_event("default", body)
    assert created.regarding.name == "m" and created.note == "done"
    core = await k8s.CoreV1Api(raw).list_namespaced_event(
        "default", field_selector="involvedObject.name=m")
    assert core.items[0].message == "done" and core.items[0].reporting_component == (
        "modelcache.io/agent")
    incomplete = dict(body, metadata={"name": "m.2", "namespace": "default"})
    del incomplete["reportingController"]
    with pytest.raises(ApiException) as e:
        await events.create_namespaced_event("default", incomplete)
    assert e.value.status == 422
    assert status_of(e.value)["details"]["causes"][0]["field"] == "reportingController"


async def test_token_review(api: FakeKubeApi, raw: k8s.ApiClient):
    api.auth.add_service_account_token("pod-token", "team-a", "runner", audiences=["modelcache"],
                                       pod=("runner-0", "uid-0"), node="n1")
    authn = k8s.AuthenticationV1Api(raw)

    async def review(token: str, audiences: list[str] | None = None) -> k8s.V1TokenReview:
        spec = {"token": token, **({"audiences": audiences} if audiences else {})}
        return await authn.create_token_review({"spec": spec})

    ok = await review("pod-token", ["modelcache"])
    assert ok.status.authenticated is True
    assert ok.status.user.username == "system:serviceaccount:team-a:runner"
    assert "system:serviceaccounts:team-a" in ok.status.user.groups
    assert ok.status.user.extra["authentication.kubernetes.io/node-name"] == ["n1"]
    assert ok.status.audiences == ["modelcache"]
    wrong_audience = await review("pod-token")  # the apiserver's own audience
    assert not wrong_audience.status.authenticated and "audiences" in wrong_audience.status.error
    unknown = await review("made-up", ["modelcache"])
    assert not unknown.status.authenticated and unknown.status.error
    with pytest.raises(ApiException) as e:
        await review("")
    assert e.value.status == 400


async def test_subject_access_review(api: FakeKubeApi, raw: k8s.ApiClient):
    api.auth.allow(groups=["system:serviceaccounts:team-a"], verbs=["get"],
                   api_groups=[G], resources=[P], namespace="team-a")
    authz = k8s.AuthorizationV1Api(raw)

    async def allowed(ns: str, verb: str = "get", user: str = "system:serviceaccount:team-a:x",
                      groups: tuple[str, ...] = ("system:serviceaccounts:team-a",)) -> bool:
        out = await authz.create_subject_access_review({"spec": {
            "user": user, "groups": list(groups),
            "resourceAttributes": {"namespace": ns, "verb": verb, "group": G, "resource": P}}})
        return bool(out.status.allowed)

    assert await allowed("team-a")
    assert not await allowed("team-b")
    assert not await allowed("team-a", "delete")
    assert not await allowed("team-a", groups=())
    with pytest.raises(ApiException) as e:
        await authz.create_subject_access_review({"spec": {"user": "x"}})
    assert e.value.status == 422


# --- TLS, in-cluster, hooks --------------------------------------------------------------


async def test_tls_and_in_cluster_configuration(tmp_path: Path):
    async with FakeKubeApi(tls=True) as api:
        api.auth.add_service_account_token("sa-token", "default", "agent")
        env = api.write_service_account(tmp_path / "sa", "sa-token", "default")
        cfg = k8s.Configuration()
        k8s_config.load_incluster_config(
            client_configuration=cfg, token_filename=str(tmp_path / "sa" / "token"),
            cert_filename=str(tmp_path / "sa" / "ca.crt"), environ=env)
        async with k8s.ApiClient(cfg) as client:
            nodes = await k8s.CoreV1Api(client).list_node()
        assert nodes.items == [] and api.url.startswith("https://")
        assert api.requests[-1].user == "system:serviceaccount:default:agent"


async def test_fault_injection_and_request_counts(api: FakeKubeApi, raw: k8s.ApiClient):
    v1 = k8s.CoreV1Api(raw)
    api.fail_next("list", "nodes", code=503, retry_after=2)
    with pytest.raises(ApiException) as e:
        await v1.list_node()
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "2"
    await v1.list_node()
    assert api.count("list", "nodes") == 2
    assert api.by_path[("list", "/api/v1/nodes")] == 2


# --- the watch cache, traffic, garbage collection, leases ----------------------------------


async def test_lists_from_the_watch_cache_ignore_limit(api: FakeKubeApi, raw: k8s.ApiClient):
    """As kube-apiserver's cacher (without the 1.31+ consistent reads from cache): a list
    at resourceVersion 0 is the cache's whole list whatever the limit; a list without a
    resourceVersion reads etcd and pages; one at a resourceVersion without limit is the
    cache's, not older than asked."""
    for i in range(3):
        api.cluster.create("nodes", node(f"n{i}"))
    v1 = k8s.CoreV1Api(raw)
    cached = await v1.list_node(resource_version="0", limit=1)
    assert len(cached.items) == 3 and not cached.metadata._continue
    paged = await v1.list_node(limit=1)
    assert len(paged.items) == 1 and paged.metadata._continue
    fresh = await v1.list_node(resource_version=cached.metadata.resource_version)
    assert len(fresh.items) == 3
    assert [r.served_from for r in api.requests] == ["cache", "etcd", "cache"]
    with pytest.raises(ApiException) as e:  # newer than the cache: it waits, then gives up
        await v1.list_node(resource_version=str(api.cluster.rv + 5))
    assert e.value.status == 504


async def test_traffic_counts_the_bytes_on_the_wire(api: FakeKubeApi, raw: k8s.ApiClient):
    custom = k8s.CustomObjectsApi(raw)
    body = cached_model("m")
    await custom.create_namespaced_custom_object(G, V, "default", P, body)
    assert api.requests[-1].bytes_in == len(json.dumps(body).encode())
    resp = await custom.list_namespaced_custom_object(
        G, V, "default", P, watch=True, resource_version="0", timeout_seconds=1,
        _preload_content=False)
    raw_stream = await resp.read()
    watch = api.requests[-1]
    assert watch.bytes_out == len(raw_stream) and watch.events_out == 1
    traffic = api.traffic(P)
    assert (traffic.writes, traffic.written) == (1, api.requests[0].bytes_in)
    assert (traffic.watch_events, traffic.watched) == (1, len(raw_stream))
    assert (api.traffic(P) - traffic).requests == 0


async def test_dependents_go_with_their_owner(api: FakeKubeApi, raw: k8s.ApiClient):
    """kube-controller-manager's garbage collector: a dependent whose owners are all gone
    is deleted (background); one with another owner left loses the reference; Orphan keeps
    dependents."""
    v1, custom = k8s.CoreV1Api(raw), k8s.CustomObjectsApi(raw)
    owners = [await v1.create_node(node(name)) for name in ("a", "b", "c")]

    def owned_by(*nodes: k8s.V1Node) -> list[dict]:
        return [{"apiVersion": "v1", "kind": "Node", "name": n.metadata.name,
                 "uid": n.metadata.uid} for n in nodes]

    for name, refs in (("only-a", owned_by(owners[0])), ("a-and-b", owned_by(*owners[:2])),
                       ("only-c", owned_by(owners[2]))):
        await custom.create_cluster_custom_object(G, V, "nodecaches", {
            "apiVersion": f"{G}/{V}", "kind": "NodeCache",
            "metadata": {"name": name, "ownerReferences": refs}})
    await v1.delete_node("a")
    left = await custom.list_cluster_custom_object(G, V, "nodecaches")
    assert [i["metadata"]["name"] for i in left["items"]] == ["a-and-b", "only-c"]
    assert [r["name"] for r in left["items"][0]["metadata"]["ownerReferences"]] == ["b"]
    await v1.delete_node("c", propagation_policy="Orphan")
    kept = await custom.get_cluster_custom_object(G, V, "nodecaches", "only-c")
    assert "ownerReferences" not in kept["metadata"]


async def test_leases_are_taken_at_a_resource_version(api: FakeKubeApi, raw: k8s.ApiClient):
    leases = k8s.CoordinationV1Api(raw)
    made = await leases.create_namespaced_lease("default", {
        "metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                                            "renewTime": "2025-01-01T00:00:00.000000Z"}})
    assert made.spec.renew_time.year == 2025 and made.spec.holder_identity == "a"
    made.spec.holder_identity = "b"
    taken = await leases.replace_namespaced_lease("l", "default", made)
    made.spec.holder_identity = "c"
    with pytest.raises(ApiException) as e:
        await leases.replace_namespaced_lease("l", "default", made)
    assert e.value.status == 409
    assert (await leases.read_namespaced_lease("l", "default")).spec.holder_identity == "b"
    assert taken.metadata.resource_version != made.metadata.resource_version
    with pytest.raises(ApiException) as e:
        await leases.create_namespaced_lease("default", {
            "metadata": {"name": "bad"}, "spec": {"leaseDurationSeconds": 0}})
    assert e.value.status == 422
