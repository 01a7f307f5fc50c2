"""common/kube (the client and its informers) against the fake apiserver: informers that lose
nothing, conflict-free writes, events, reviews, secrets, configuration (inline keys, exec
plugins), and errors translated at the boundary."""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import trustme
import yaml

from common.errors import Conflict, InvalidInput, KubeError, NotFound, TransientError
from common.kube.client import Found, KubeClient, connect, find_config
from common.kube.settings import KubeSettings
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import (
    AGENT_NAMESPACE,
    AGENT_SA,
    AGENT_TOKEN,
    AGENT_USER,
    FAST,
    Recorder,
)
from tests.kubeapi.objects import cached_model, node, pod, secret

CM = "cachedmodels"


# --- connecting, errors ------------------------------------------------------------------


async def test_connect_in_cluster_over_tls(tmp_path: Path):
    async with FakeKubeApi(tls=True) as api:
        api.auth.add_service_account_token("sa", AGENT_NAMESPACE, AGENT_SA)
        env = api.write_service_account(tmp_path / "sa", "sa", "default")
        async with await connect(None, FAST, service_account_dir=tmp_path / "sa",
                                 environ=env) as kube:
            api.cluster.create("nodes", node("n1"))
            assert (await kube.get_node("n1"))["metadata"]["name"] == "n1"
        assert api.requests[-1].user == f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SA}"
        kubeconfig = api.write_kubeconfig(tmp_path / "kc", token="sa")
        async with await connect(str(kubeconfig), FAST) as kube:
            assert (await kube.get_node("n1"))["kind"] == "Node"


async def test_connect_without_configuration_is_invalid_input(tmp_path: Path):
    with pytest.raises(InvalidInput):
        await connect(str(tmp_path / "missing"))
    with pytest.raises(InvalidInput):
        await connect(None, service_account_dir=tmp_path, environ={})
    (tmp_path / "garbage").write_text("clusters: [\n")
    with pytest.raises(InvalidInput):
        await connect(str(tmp_path / "garbage"))


def kubeconfig_of(path: Path, server: str, user: dict, cluster: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_inline_keys_and_ca_leave_no_file_behind(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """Inline ``certificate-authority-data``, ``client-certificate-data`` and
    ``client-key-data`` are written to files for ssl to load (it reads keys from files
    only), then removed: nothing is left in the temporary directory, and connecting again
    with the same kubeconfig works."""
    client = trustme.CA().issue_cert("modelcache-agent")
    async with FakeKubeApi(tls=True) as api:
        assert api.ca_path is not None
        api.auth.add_service_account_token("sa", AGENT_NAMESPACE, AGENT_SA)
        api.cluster.create("nodes", node("n1"))
        kubeconfig = kubeconfig_of(tmp_path / "kc", api.url, {
            "token": "sa",
            "client-certificate-data": b64(client.cert_chain_pems[0].bytes()),
            "client-key-data": b64(client.private_key_pem.bytes()),
        }, {"certificate-authority-data": b64(api.ca_path.read_bytes())})
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where temp files would go
        for _ in range(2):
            async with await connect(str(kubeconfig), FAST) as kube:
                assert list(scratch.iterdir()) == []
                assert (await kube.get_node("n1"))["kind"] == "Node"  # the inline CA is used
        assert list(scratch.iterdir()) == []
        broken = kubeconfig_of(tmp_path / "broken", api.url, {
            "token": "sa", "client-certificate-data": b64(b"not a certificate"),
            "client-key-data": b64(b"not a key")})
        with pytest.raises(InvalidInput, match="cannot configure"):
            await connect(str(broken), FAST)
        assert list(scratch.iterdir()) == []


async def test_an_exec_plugin_provides_the_token(api: FakeKubeApi, tmp_path: Path):
    """A kubeconfig user with an ``exec`` credential plugin (as EKS, GKE and AKS write
    them): the plugin runs and its token is used."""
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(
        f"#!{sys.executable}\nimport json, os\n"
        "asked = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "print(json.dumps({'apiVersion': asked['apiVersion'], 'kind': 'ExecCredential',\n"
        f"                  'status': {{'token': {AGENT_TOKEN!r}}}}}))\n")
    plugin.chmod(0o755)
    kubeconfig = kubeconfig_of(tmp_path / "kc", api.url, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
        "interactiveMode": "Never"}})
    api.cluster.create("nodes", node("n1"))
    async with await connect(str(kubeconfig), FAST) as kube:
        assert (await kube.get_node("n1"))["metadata"]["name"] == "n1"
    assert api.requests[-1].user == AGENT_USER
    failing = kubeconfig_of(tmp_path / "failing", api.url, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/false"}})
    with pytest.raises(InvalidInput, match="exec: process returned 1"):
        await connect(str(failing), FAST)


async def test_a_relative_ca_file_is_read_beside_the_kubeconfig(tmp_path: Path):
    async with FakeKubeApi(tls=True) as api:
        assert api.ca_path is not None
        api.auth.add_service_account_token("sa", AGENT_NAMESPACE, AGENT_SA)
        (tmp_path / "conf").mkdir()
        shutil.copy(api.ca_path, tmp_path / "conf" / "ca.crt")
        kubeconfig = kubeconfig_of(tmp_path / "conf" / "config", api.url + "/", {"token": "sa"},
                                   {"certificate-authority": "ca.crt"})
        found, why = find_config({"KUBECONFIG": str(kubeconfig)})
        assert found == Found(kubeconfig) and why == ""
        assert found.source == f"kubeconfig {kubeconfig}"  # no token in what is logged
        api.cluster.create("nodes", node("n1"))
        async with await connect(str(found.kubeconfig), FAST) as kube:
            assert (await kube.get_node("n1"))["kind"] == "Node"


def test_find_config_looks_where_controller_runtime_does(tmp_path: Path):
    """``$KUBECONFIG`` (its first file), else the in-cluster service account, else
    ``~/.kube/config``; else none, and why."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("{}")
    assert find_config({"KUBECONFIG": f"{first}{os.pathsep}{second}"}) == (Found(first), "")
    assert find_config({"KUBECONFIG": str(second)}, home=tmp_path) == (
        None, f"KUBECONFIG file {second} does not exist")
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t")
    pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert find_config(pod, home=tmp_path, service_account_dir=sa) == (Found(None), "")
    assert Found(None).source == "in-cluster"
    nowhere = tmp_path / "no-sa"
    found, why = find_config({}, home=tmp_path, service_account_dir=nowhere)
    assert found is None and "no in-cluster service account and no kubeconfig" in why
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("{}")
    assert find_config(pod, home=tmp_path, service_account_dir=nowhere) == (
        Found(tmp_path / ".kube" / "config"), "")


async def test_errors_are_translated(api: FakeKubeApi, kube: KubeClient, tmp_path: Path):
    with pytest.raises(NotFound, match='nodes "ghost" not found'):
        await kube.get_node("ghost")
    api.fail_next("get", "nodes", code=503, retry_after=7)
    with pytest.raises(TransientError) as e:
        await kube.get_node("ghost")
    assert e.value.retry_after == 7.0
    api.enforce_rbac = True  # the agent has no rights at all now
    with pytest.raises(KubeError, match="forbidden"):
        await kube.get_node("ghost")
    api.enforce_rbac = False
    kubeconfig = api.write_kubeconfig(tmp_path / "kc", token="revoked")
    async with await connect(str(kubeconfig), FAST) as stranger:
        with pytest.raises(KubeError, match="401"):
            await stranger.get_node("ghost")
    await api.stop()  # (the fixture's own stop() afterwards does nothing)
    with pytest.raises(TransientError, match="unreachable"):
        await kube.get_node("ghost")


# --- informers ---------------------------------------------------------------------------


async def test_pods_on_node_informer(api: FakeKubeApi, kube: KubeClient):
    c = api.cluster
    c.create("pods", pod("here", "n1"), "default")
    c.create("pods", pod("there", "n2"), "default")
    c.create("pods", pod("pending"), "default")
    informer = kube.watch_pods_on_node("n1")
    async with Recorder(informer) as rec:
        assert await rec.take(1) == [("ADDED", "here", True)]
        await api.wait_for_watch("pods")
        assert informer.synced.is_set()
        c.create("pods", pod("new", "n1"), "default")
        # scheduling a pending pod onto the node: it appears
        c.patch("pods", "pending", {"spec": {"nodeName": "n1"}}, "default")
        c.patch("pods", "here", {"metadata": {"labels": {"x": "y"}}}, "default")
        assert await rec.take(3) == [
            ("ADDED", "new", False), ("ADDED", "pending", False), ("MODIFIED", "here", False)]
        # deleting a running pod: terminating first (still using its model), then gone
        c.delete("pods", "here", "default")
        [(kind, _, _)] = await rec.take(1)
        assert kind == "MODIFIED"
        assert informer.get("here", "default")["metadata"]["deletionTimestamp"]
        c.finish_pod_deletion("here", "default")
        assert await rec.take(1) == [("DELETED", "here", False)]
    assert set(informer.store) == {"default/new", "default/pending"}
    assert informer.store["default/new"]["kind"] == "Pod"  # list items get their kind back
    watch = next(r for r in api.requests if r.verb == "watch")
    assert watch.query["fieldSelector"] == "spec.nodeName=n1"
    assert watch.query["allowWatchBookmarks"] in ("true", "True")  # Go's ParseBool takes both


async def test_informers_list_from_the_watch_cache(api: FakeKubeApi, tmp_path: Path):
    """The first list asks for resourceVersion=0 (the watch cache answers it whole, whatever
    the limit); a relist after a 410 asks for the last resourceVersion seen (the cache
    again); only a relist the cache refused with 410 reads etcd, in pages."""
    c = api.cluster
    for i in range(5):
        c.create(CM, cached_model(f"m{i}"), "default")
    kubeconfig = api.write_kubeconfig(tmp_path / "kc", token=AGENT_TOKEN)
    async with await connect(str(kubeconfig), KubeSettings(list_page_size=2, backoff_base=0.01,
                                                           backoff_max=0.05)) as kube:
        informer = kube.watch_cached_models()
        async with Recorder(informer) as rec:
            assert [n for _, n, _ in await rec.take(5)] == [f"m{i}" for i in range(5)]
            await api.wait_for_watch(CM)
            [first] = [r for r in api.requests if r.verb == "list"]
            assert (first.query["resourceVersion"], first.query["limit"]) == ("0", "2")
            assert first.served_from == "cache"

            c.create(CM, cached_model("m5"), "default")
            assert await rec.take(1) == [("ADDED", "m5", False)]
            seen = informer.resource_version
            c.break_watches(CM)
            c.create(CM, cached_model("m6"), "default")
            c.compact()  # the watch resumes from a compacted version: 410
            assert await rec.take(1) == [("ADDED", "m6", True)]
            relist = [r for r in api.requests if r.verb == "list"][1]
            assert relist.query["resourceVersion"] == seen
            assert "limit" not in relist.query and relist.served_from == "cache"

            api.fail_next("list", CM, code=410, message="too old resource version")
            c.break_watches(CM)
            c.create(CM, cached_model("m7"), "default")
            c.compact()
            assert await rec.take(1) == [("ADDED", "m7", True)]
    lists = [r for r in api.requests if r.verb == "list"]
    consistent = lists[3:]
    assert [r.status for r in lists[2:]] == [410, 200, 200, 200, 200]
    assert all("resourceVersion" not in r.query and r.served_from == "etcd"
               for r in consistent)
    assert [r.query.get("limit") for r in consistent] == ["2", "2", "2", "2"]
    assert informer.lists == 4 and informer.resource_version == str(c.rv)


async def test_broken_stream_resumes_without_losing_changes(api: FakeKubeApi, kube: KubeClient):
    c = api.cluster
    for name in ("a", "b"):
        c.create(CM, cached_model(name), "default")
    informer = kube.watch_cached_models()
    async with Recorder(informer) as rec:
        await rec.take(2)
        await api.wait_for_watch(CM)
        # the connection drops, and the next two attempts fail, while things change
        api.fail_next("watch", CM, code=503, times=2)
        c.break_watches(CM)
        c.create(CM, cached_model("c"), "default")
        c.patch(CM, "a", {"spec": {"pin": True}}, "default")
        c.delete(CM, "b", "default")
        assert await rec.take(3) == [
            ("ADDED", "c", False), ("MODIFIED", "a", False), ("DELETED", "b", False)]
        await api.wait_for_watch(CM, 4)
    assert informer.lists == 1  # resumed from its resourceVersion: no relist needed
    assert isinstance(informer.last_error, TransientError)
    assert set(informer.store) == {"default/a", "default/c"}
    watches = [r for r in api.requests if r.verb == "watch"]
    # every retry resumed from where the first watch started (no event came in between)
    assert {w.query["resourceVersion"] for w in watches} == {watches[0].query["resourceVersion"]}
    assert [w.status for w in watches] == [200, 503, 503, 200]
    assert rec.nothing_more()


async def test_410_relists_and_reports_what_happened_meanwhile(
    api: FakeKubeApi, kube: KubeClient
):
    c = api.cluster
    for name in ("a", "b", "c"):
        c.create(CM, cached_model(name), "default")
    informer = kube.watch_cached_models()
    async with Recorder(informer) as rec:
        await rec.take(3)
        await api.wait_for_watch(CM)
        c.break_watches(CM)
        c.patch(CM, "b", {"spec": {"pin": True}}, "default")
        c.delete(CM, "c", "default")
        c.create(CM, cached_model("d"), "default")
        c.compact()  # the informer's resourceVersion is now too old: 410
        got = await rec.take(3)
        assert sorted(got) == [
            ("ADDED", "d", True), ("DELETED", "c", True), ("MODIFIED", "b", True)]
        await api.wait_for_watch(CM, 3)
        c.create(CM, cached_model("e"), "default")  # and it keeps watching afterwards
        assert await rec.take(1) == [("ADDED", "e", False)]
    assert informer.lists == 2
    assert set(informer.store) == {"default/a", "default/b", "default/d", "default/e"}
    assert informer.store["default/b"]["spec"]["pin"] is True
    assert api.count("watch", CM, status=200) == 3  # first, the 410 one, after the relist


async def test_expire_next_watch_relists_quietly(api: FakeKubeApi, kube: KubeClient):
    api.cluster.create(CM, cached_model("a"), "default")
    informer = kube.watch_cached_models()
    async with Recorder(informer) as rec:
        await rec.take(1)
        await api.wait_for_watch(CM)
        api.cluster.expire_next_watch()
        api.cluster.break_watches(CM, clean=True)
        await api.wait_for_watch(CM, 3)
        assert informer.lists == 2 and rec.nothing_more()  # nothing changed: nothing said


async def test_bookmarks_move_the_resume_point(api: FakeKubeApi, kube: KubeClient):
    c = api.cluster
    informer = kube.watch_pods_on_node("n1")
    async with Recorder(informer):
        await api.wait_for_watch("pods")
        for i in range(3):
            c.create("nodes", node(f"other-{i}"))  # changes this watch does not see
        fresh = str(c.rv)
        c.send_bookmarks()
        c.break_watches("pods", clean=True)  # after the bookmark, in order
        c.compact()  # anything older than the bookmark is gone
        again = await api.wait_for_watch("pods", 2)
    assert again.query["resourceVersion"] == fresh
    assert informer.lists == 1  # no 410: the bookmark kept it current


async def test_timed_out_watches_are_renewed(tmp_path: Path):
    async with FakeKubeApi(max_watch_seconds=0.2) as api:
        api.auth.add_service_account_token(AGENT_TOKEN, AGENT_NAMESPACE, AGENT_SA)
        async with await connect(str(api.write_kubeconfig(tmp_path / "kc", AGENT_TOKEN)),
                                 FAST) as kube:
            informer = kube.watch_node("n1")
            async with Recorder(informer) as rec:
                await api.wait_for_watch("nodes", 3)
                api.cluster.create("nodes", node("n1"))
                api.cluster.create("nodes", node("n2"))
                assert await rec.take(1) == [("ADDED", "n1", False)]
        assert informer.lists == 1
        assert [r.query["fieldSelector"] for r in api.requests] == [
            "metadata.name=n1"] * len(api.requests)


async def test_failing_lists_are_retried(api: FakeKubeApi, kube: KubeClient):
    api.cluster.create(CM, cached_model("a"), "default")
    api.fail_next("list", CM, code=500, times=2)
    informer = kube.watch_cached_models()
    async with Recorder(informer) as rec:
        assert await rec.take(1) == [("ADDED", "a", True)]
    assert api.count("list", CM) == 3 and isinstance(informer.last_error, TransientError)


# --- writes ------------------------------------------------------------------------------


async def test_node_labels_touch_only_model_labels(api: FakeKubeApi, kube: KubeClient):
    api.cluster.create("nodes", node("n1", {"team": "ml", "modelcache.io/m-old": "ready"}))
    await kube.patch_node_labels("n1", {"modelcache.io/m-0123456789abcdef": "ready"},
                                 ["modelcache.io/m-old"])
    labels = api.cluster.get("nodes", "n1")["metadata"]["labels"]
    assert labels == {"kubernetes.io/hostname": "n1", "team": "ml",
                      "modelcache.io/m-0123456789abcdef": "ready"}
    assert api.requests[-1].content_type == "application/merge-patch+json"
    rv = api.cluster.rv
    await kube.patch_node_labels("n1", {}, [])  # nothing to do: no request
    await kube.patch_node_labels("n1", {"modelcache.io/m-0123456789abcdef": "ready"})
    assert api.cluster.rv == rv  # same value: the server writes nothing
    for bad_add, bad_remove in [({"team": "x"}, []), ({}, ["kubernetes.io/hostname"]),
                                ({"modelcache.io/m-a": "not ok!"}, []),
                                ({"modelcache.io/m-a": "ready"}, ["modelcache.io/m-a"])]:
        with pytest.raises(InvalidInput):
            await kube.patch_node_labels("n1", bad_add, bad_remove)
    with pytest.raises(NotFound):
        await kube.patch_node_labels("ghost", {"modelcache.io/m-a": "ready"})


async def test_node_cache_created_owned_by_its_node_then_patched(
        api: FakeKubeApi, kube: KubeClient):
    c = api.cluster
    n1 = c.create("nodes", node("n1"))
    entry = {"namespace": "default", "name": "m", "uid": "u1", "key": "k" * 24,
             "state": "failed", "message": "boom", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    out = await kube.create_node_cache(n1, {"models": [entry], "ready": 0, "pulling": 0,
                                            "failed": 1, "bytes": 0})
    assert out["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": n1["metadata"]["uid"]}]
    assert out["status"]["models"] == [entry]
    ready = {**entry, "state": "ready", "revision": "abc", "bytes": 5 * 2**40}
    del ready["message"]
    out = await kube.patch_node_cache("n1", {"models": [ready], "ready": 1})
    assert out["status"] == {"models": [ready], "ready": 1}  # the rest cleared
    assert out == c.get("nodecaches", "n1") == await kube.get_node_cache("n1")
    with pytest.raises(Conflict):
        await kube.create_node_cache(n1, {"models": []})
    with pytest.raises(InvalidInput):
        await kube.patch_node_cache("n1", {"models": [{"state": "ready"}]})  # no name
    with pytest.raises(InvalidInput):
        await kube.patch_node_cache("n1", {"nodes": {}})
    with pytest.raises(NotFound):
        await kube.patch_node_cache("ghost", {"models": []})
    # the garbage collector deletes it with its node
    c.delete("nodes", "n1")
    assert not c.exists("nodecaches", "n1")


async def test_cached_model_counts(api: FakeKubeApi, kube: KubeClient):
    api.cluster.create(CM, cached_model("m"), "default")
    out = await kube.patch_cached_model_counts("default", "m",
                                               {"ready": 3, "pulling": 1, "failed": 0})
    assert out["status"] == {"ready": 3, "pulling": 1, "failed": 0}
    assert api.requests[-1].resource == f"{CM}/status"
    with pytest.raises(InvalidInput):
        await kube.patch_cached_model_counts("default", "m", {"nodes": 3})
    with pytest.raises(NotFound):
        await kube.patch_cached_model_counts("default", "gone", {"ready": 1})


async def test_leases(api: FakeKubeApi, kube: KubeClient):
    body = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a",
                                                "leaseDurationSeconds": 15}}
    made = await kube.create_lease(AGENT_NAMESPACE, body)
    got = await kube.get_lease(AGENT_NAMESPACE, "l")
    assert got == made and got["kind"] == "Lease"
    taken = await kube.replace_lease(AGENT_NAMESPACE, "l", {
        **got, "spec": {**got["spec"], "holderIdentity": "b"}})
    with pytest.raises(Conflict):  # written since it was read
        await kube.replace_lease(AGENT_NAMESPACE, "l", {
            **got, "spec": {**got["spec"], "holderIdentity": "c"}})
    assert taken["spec"]["holderIdentity"] == "b"


async def test_events(api: FakeKubeApi, kube: KubeClient):
    model = api.cluster.create(CM, cached_model("m"), "default")
    api.cluster.create("nodes", node("n1"))
    assert await kube.emit_event(model, "Pulled", "pulled in 3s", action="Pull")
    assert await kube.emit_event(api.cluster.get("nodes", "n1"), "DiskPressure", "x" * 5000,
                                 type="Warning")
    [pulled] = api.cluster.events("m")
    assert pulled["metadata"]["namespace"] == "default"
    assert pulled["involvedObject"] == {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel", "name": "m",
        "namespace": "default", "uid": model["metadata"]["uid"]}
    assert (pulled["reason"], pulled["message"], pulled["action"], pulled["type"]) == (
        "Pulled", "pulled in 3s", "Pull", "Normal")
    assert pulled["reportingComponent"] == "modelcache.io/agent"
    assert pulled["reportingInstance"] == "agent-node-1"
    [pressure] = api.cluster.events("n1")
    assert pressure["metadata"]["namespace"] == "default"  # cluster-scoped object
    assert len(pressure["message"].encode()) <= 1024
    api.fail_next("create", "events", code=500)
    assert not await kube.emit_event(model, "Pulled", "again")  # best effort: no raise


# --- reviews, secrets --------------------------------------------------------------------


async def test_token_review(api: FakeKubeApi, kube: KubeClient):
    api.auth.add_service_account_token("pod-tok", "team-a", "app", audiences=["modelcache"],
                                       pod=("app-0", "uid-1"), node="n1")
    review = await kube.token_review("pod-tok", ["modelcache"])
    assert review.authenticated and review.user == "system:serviceaccount:team-a:app"
    assert "system:serviceaccounts:team-a" in review.groups
    assert review.extra["authentication.kubernetes.io/pod-name"] == ("app-0",)
    assert not (await kube.token_review("pod-tok", ["other"])).authenticated
    assert not (await kube.token_review("forged", ["modelcache"])).authenticated
    assert not (await kube.token_review("", ["modelcache"])).authenticated


async def test_subject_access_review(api: FakeKubeApi, kube: KubeClient):
    api.auth.allow(users=["alice"], verbs=["create"], api_groups=["modelcache.io"],
                   resources=[CM], namespace="team-a")
    assert await kube.subject_access_review("alice", [], "create", CM, "team-a",
                                            group="modelcache.io")
    assert not await kube.subject_access_review("alice", [], "create", CM, "team-b",
                                                group="modelcache.io")
    assert not await kube.subject_access_review("bob", ["devs"], "create", CM, "team-a",
                                                group="modelcache.io")


async def test_read_secret(api: FakeKubeApi, kube: KubeClient):
    api.cluster.create("secrets", secret("creds", HF_TOKEN="hf_secret", user="me"), "default")
    assert await kube.read_secret("default", "creds") == {"HF_TOKEN": "hf_secret", "user": "me"}
    with pytest.raises(NotFound):
        await kube.read_secret("default", "nope")
    binary = base64.b64encode(b"\xff\xfe-hidden-\xff").decode()
    api.cluster.create("secrets", {"metadata": {"name": "bin"}, "data": {"k": binary}},
                       "default")
    with pytest.raises(InvalidInput) as e:
        await kube.read_secret("default", "bin")
    assert "hidden" not in str(e.value) and e.value.__cause__ is None
