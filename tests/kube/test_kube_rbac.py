"""deploy/base/rbac-agent.yaml and rbac-webhook.yaml are exactly what the agent and the
webhook (its counts controller and Lease included) need: the fake apiserver enforces them,
every call each makes succeeds, every verb granted is used, and anything beyond is
refused."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from agent.pull.credentials import SecretCredentials
from common.errors import NotFound, SourceAuthError
from common.kube.client import KubeClient, connect
from common.kube.lease import LeaderElection, LeaseSettings
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import AGENT_TOKEN, AGENT_USER, FAST, Recorder
from tests.kubeapi.objects import cached_model, namespace, node, pod, secret, secrets_binding
from tests.kubeapi.server import REPO
from webhook.counts import Counts

RBAC = REPO / "deploy" / "base" / "rbac-agent.yaml"
WEBHOOK_RBAC = REPO / "deploy" / "base" / "rbac-webhook.yaml"
CM = "cachedmodels"
WEBHOOK_TOKEN = "webhook-sa-token"
WEBHOOK_USER = "system:serviceaccount:modelcache:modelcache-webhook"


def rbac_docs(path: Path = RBAC) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def granted(path: Path = RBAC) -> set[tuple[str, str, str]]:
    roles = [d for d in rbac_docs(path) if d["kind"] in ("ClusterRole", "Role")]
    return {(group, resource, verb) for role in roles for rule in role["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


async def test_the_agent_needs_exactly_its_rbac(api: FakeKubeApi, kube: KubeClient):
    api.auth.load_rbac([*rbac_docs(), secrets_binding("default")])
    api.enforce_rbac = True
    c = api.cluster
    c.create("nodes", node("n1"))
    model = c.create(CM, cached_model("m", credentialsSecret="creds"), "default")
    c.create("secrets", secret("creds", token="t"), "default")
    c.create("pods", pod("p", "n1"), "default")
    api.auth.add_service_account_token("caller", "default", "app", audiences=["modelcache"])

    for informer in (kube.watch_cached_models(), kube.watch_pods_on_node("n1"),
                     kube.watch_node("n1")):
        async with Recorder(informer) as rec:
            await rec.take(1)
            await api.wait_for_watch(informer.resource)
    n1 = await kube.get_node("n1")
    await kube.patch_node_labels("n1", {"modelcache.io/m-0123456789abcdef": "ready"})
    with pytest.raises(NotFound):
        await kube.get_node_cache("n1")
    entry = {"namespace": "default", "name": "m", "state": "ready"}
    await kube.create_node_cache(n1, {"models": [entry], "ready": 1})
    await kube.patch_node_cache("n1", {"models": [{**entry, "state": "pulling"}], "pulling": 1})
    await kube.get_node_cache("n1")
    assert await kube.emit_event(model, "Pulled", "ok")
    assert (await kube.token_review("caller", ["modelcache"])).authenticated
    await kube.subject_access_review("x", [], "get", CM, "default", group="modelcache.io")
    assert await kube.read_secret("default", "creds") == {"token": "t"}
    c.create("configmaps", {"metadata": {"name": "signed"}, "data": {"publicKey": "PEM"}},
             "default")
    assert await kube.read_config_map("default", "signed") == {"publicKey": "PEM"}

    mine = [r for r in api.requests if r.user == AGENT_USER]
    assert [(r.verb, r.resource) for r in mine if r.status == 403] == []
    used = {(r.group, r.resource, r.verb) for r in mine}
    assert granted() - used == set(), "granted but never used: drop it from the role"
    assert used - granted() == set()


async def test_the_agent_cannot_do_more(api: FakeKubeApi, tmp_path: Path):
    api.auth.load_rbac(rbac_docs())
    api.enforce_rbac = True
    api.cluster.create("pods", pod("p", "n1"), "default")
    api.cluster.create("nodes", node("n1"))
    api.cluster.create("secrets", secret("creds", token="t"), "default")
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(api.write_kubeconfig(tmp_path / "kc", token=AGENT_TOKEN)),
        client_configuration=cfg, persist_config=False)
    async with k8s.ApiClient(cfg) as client:
        v1, custom = k8s.CoreV1Api(client), k8s.CustomObjectsApi(client)
        merge = "application/merge-patch+json"
        attempts = [
            v1.read_namespaced_secret("creds", "default"),  # no namespace granted it
            v1.list_namespaced_secret("default"),
            v1.list_namespaced_config_map("default"),
            v1.delete_namespaced_pod("p", "default"),
            v1.read_namespaced_pod("p", "default"),
            v1.replace_node("n1", node("n1")),
            v1.delete_node("n1"),
            v1.create_namespaced_event("default", {"metadata": {"name": "e"}}),
            custom.create_namespaced_custom_object("modelcache.io", "v1alpha1", "default", CM,
                                                   cached_model("x")),
            custom.patch_namespaced_custom_object("modelcache.io", "v1alpha1", "default", CM,
                                                  "x", {"spec": {"pin": True}},
                                                  _content_type=merge),
            custom.delete_namespaced_custom_object("modelcache.io", "v1alpha1", "default", CM,
                                                   "x"),
            # what an agent of the former release does until the DaemonSet has rolled: its
            # entry in status.nodes, its counts, and a re-read after a conflict on them
            custom.patch_namespaced_custom_object_status(
                "modelcache.io", "v1alpha1", "default", CM, "x",
                {"status": {"nodes": {"n1": {"state": "ready"}}, "ready": 1}},
                _content_type=merge),
            custom.get_namespaced_custom_object("modelcache.io", "v1alpha1", "default", CM,
                                                "x"),
            # the NodeCaches: never listed, watched nor deleted by an agent
            custom.list_cluster_custom_object("modelcache.io", "v1alpha1", "nodecaches"),
            custom.delete_cluster_custom_object("modelcache.io", "v1alpha1", "nodecaches",
                                                "n2"),
        ]
        for attempt in attempts:
            with pytest.raises(ApiException) as e:
                await attempt
            assert e.value.status == 403


async def test_the_webhook_needs_exactly_its_rbac(api: FakeKubeApi, tmp_path: Path):
    """Its namespace informer, its counts controller (informers and a counts write) and its
    Lease (created, renewed, released) under exactly rbac-webhook.yaml."""
    api.auth.load_rbac(rbac_docs(WEBHOOK_RBAC))
    api.auth.add_service_account_token(WEBHOOK_TOKEN, "modelcache", "modelcache-webhook")
    api.enforce_rbac = True
    c = api.cluster
    model = c.create(CM, cached_model("m"), "default")
    c.create("nodecaches", {"metadata": {"name": "n1"}, "status": {"models": [
        {"namespace": "default", "name": "m", "uid": model["metadata"]["uid"],
         "state": "ready"}]}})
    kubeconfig = api.write_kubeconfig(tmp_path / "webhook.kc", token=WEBHOOK_TOKEN)
    async with await connect(str(kubeconfig), FAST) as kube:
        async with Recorder(kube.watch_namespaces()) as rec:
            await rec.take(1)
            await api.wait_for_watch("namespaces")
        election = LeaderElection(kube, "modelcache", "modelcache-counts", "replica-1",
                                  LeaseSettings(duration=2, renew_deadline=1, retry=0.05))
        task = asyncio.create_task(election.run(Counts(kube, interval=0).run))
        try:
            async with asyncio.timeout(10):
                await c.wait_until(lambda: (c.get(CM, "m", "default").get("status") or {})
                                   .get("ready") == 1)
                renewals = api.count("update", "leases")
                await c.wait_until(lambda: api.count("update", "leases") > renewals)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert not c.get("leases", "modelcache-counts", "modelcache")["spec"].get("holderIdentity")
    mine = [r for r in api.requests if r.user == WEBHOOK_USER]
    assert [(r.verb, r.resource) for r in mine if r.status == 403] == []
    used = {(r.group, r.resource, r.verb) for r in mine}
    assert granted(WEBHOOK_RBAC) - used == set(), "granted but never used: drop it"
    assert used - granted(WEBHOOK_RBAC) == set()
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg,
                                      persist_config=False)
    async with k8s.ApiClient(cfg) as client:
        custom, coordination = k8s.CustomObjectsApi(client), k8s.CoordinationV1Api(client)
        merge = "application/merge-patch+json"
        for attempt in [
            custom.patch_namespaced_custom_object("modelcache.io", "v1alpha1", "default", CM,
                                                  "m", {"spec": {"pin": True}},
                                                  _content_type=merge),
            custom.patch_cluster_custom_object("modelcache.io", "v1alpha1", "nodecaches",
                                               "n1", {"status": {}}, _content_type=merge),
            coordination.read_namespaced_lease("other", "modelcache"),
            coordination.list_namespaced_lease("default"),
        ]:
            with pytest.raises(ApiException) as e:
                await attempt
            assert e.value.status == 403


async def test_secrets_are_read_only_where_a_namespace_granted_it(api: FakeKubeApi,
                                                                  kube: KubeClient):
    """No ClusterRole lets the agent read Secrets: team-a's admin bound the agent's secrets
    role there, team-b's did not, and the agent's refusal there says what to do."""
    api.auth.load_rbac([*rbac_docs(), secrets_binding("team-a")])
    api.enforce_rbac = True
    for ns in ("team-a", "team-b"):
        api.cluster.create("namespaces", namespace(ns))
        api.cluster.create("secrets", secret("hf", ns, token=f"tok-{ns}"), ns)
    credentials = SecretCredentials(kube)
    assert await credentials.get("team-a", "hf") == {"token": "tok-team-a"}
    with pytest.raises(SourceAuthError) as e:
        await credentials.get("team-b", "hf")
    assert "namespace team-b" in str(e.value)
    assert "RoleBinding to ClusterRole modelcache-agent-secrets" in str(e.value)
    assert "tok-" not in str(e.value)
    [role] = [d for d in rbac_docs() if d["kind"] == "ClusterRole"
              and d["metadata"]["name"] == "modelcache-agent"]
    assert not [r for r in role["rules"] if "secrets" in r["resources"]]
    assert not [d for d in rbac_docs() if d["kind"] == "ClusterRoleBinding"
                and d["roleRef"]["name"] == "modelcache-agent-secrets"]
