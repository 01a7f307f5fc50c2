"""The CSI node service of a real agent process in a cluster (the fake apiserver): the pod's
token, which kubelet passes, is checked with a TokenReview and the credentials-scope rule is
applied to the pod's namespace before anything is mounted."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from agent.csi.proto import csi_pb2 as pb
from common.reference import scoped
from tests.csi.conftest import csi_args, mounts_under, write_model
from tests.csi.kubelet import AUDIENCE, Kubelet, Pod, Published, PublishFailed
from tests.csi.pod import read_as_pod
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import AGENT_TOKEN, kube_api  # noqa: F401
from tests.kubeapi.objects import namespace, node, pod, secret
from tests.servers.agent import AgentProcess
from tests.servers.hfhub import HubServer

NODE = "n1"
FILES = {"config.json": b'{"a": 1}', "weights.bin": os.urandom(200_000)}
HUB_TOKENS = {"team-a": "hf_token-of-team-a-31c", "team-b": "hf_token-of-team-b-77e"}


def make_pod(api: FakeKubeApi, name: str, ns: str, *, account: str = "default",
             node_name: str = NODE) -> Pod:
    """A pod on a node, as the API server has it; kubelet's Pod for it."""
    if not api.cluster.exists("namespaces", ns):
        api.cluster.create("namespaces", namespace(ns))
    obj = pod(name, node_name, ns)
    obj["spec"]["serviceAccountName"] = account
    created = api.cluster.create("pods", obj, ns)
    return Pod(name, ns, created["metadata"]["uid"], account)


def bound_token(api: FakeKubeApi, p: Pod, *, node_name: str = NODE,
                audiences: tuple[str, ...] = (AUDIENCE,), uid: str | None = None) -> str:
    """The token kubelet requests for the pod (tokenRequests): bound to it and its node."""
    token = f"token-{p.namespace}-{p.name}-{uid or p.uid}-{node_name}-{len(audiences)}"
    api.auth.add_service_account_token(token, p.namespace, p.service_account,
                                       audiences=list(audiences), pod=(p.name, uid or p.uid),
                                       node=node_name)
    return token


@pytest.fixture
def cluster(kube_api: FakeKubeApi) -> FakeKubeApi:  # noqa: F811 (pytest injects it)
    kube_api.cluster.create("nodes", node(NODE, {}))
    return kube_api


@pytest.fixture
def hub() -> Iterator[HubServer]:
    from tests.servers.hfhub import hub_server

    with ExitStack() as stack:
        yield stack.enter_context(hub_server(tokens=set(HUB_TOKENS.values())))


@pytest.fixture
async def cluster_agent(cluster: FakeKubeApi, hub: HubServer, tmp_path: Path,
                        kubelet_root: Path, seed: Path) -> AsyncIterator[AgentProcess]:
    kubeconfig = cluster.write_kubeconfig(tmp_path / "agent.kubeconfig", token=AGENT_TOKEN)
    agent = AgentProcess(tmp_path / "store", allow_paths=[seed], log_dir=tmp_path / "logs",
                         kubeconfig=kubeconfig, node=NODE, env={"HF_ENDPOINT": hub.base_url},
                         extra_args=csi_args(tmp_path, kubelet_root, wait=10))
    await asyncio.to_thread(agent.start)  # the fake apiserver answers on this loop meanwhile
    try:
        yield agent
    finally:
        await asyncio.to_thread(agent.stop)


Build = Callable[[Kubelet], pb.NodePublishVolumeRequest]


def refusals(api: FakeKubeApi, good: Pod, uri: str) -> dict[str, Build]:
    """Requests kubelet could send for ``good``'s volume that must not be published."""
    api.auth.add_service_account_token("builder-token", good.namespace, "builder",
                                       audiences=[AUDIENCE], pod=(good.name, good.uid), node=NODE)
    api.auth.add_service_account_token("api-audience-token", good.namespace, "default")

    def request(token: str | None) -> Build:
        return lambda k: k.publish_request(good, "model", {"model": uri}, token=token)

    return {
        "no token": request(None),
        "a token the cluster does not know": request("forged-token"),
        "a token for the API's audience, not ours": request("api-audience-token"),
        "a token of another service account": request("builder-token"),
        "a token bound to another pod": request(bound_token(api, good, uid="another-uid")),
        "a token bound to a pod of another node": request(bound_token(api, good, node_name="n2")),
    }


async def test_the_pods_token_is_reviewed_before_anything_is_mounted(
        cluster: FakeKubeApi, cluster_agent: AgentProcess, kubelet: Kubelet, seed: Path):
    uri = f"file://{write_model(seed / 'public', FILES)}"
    good = make_pod(cluster, "web-0", "team-a")
    for what, build in refusals(cluster, good, uri).items():
        with pytest.raises(PublishFailed) as refused:
            await kubelet.publish_once(build(kubelet))
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, (what, refused.value)
        assert mounts_under(kubelet.root) == [], what
    no_info = kubelet.publish_request(good, "model", {"model": uri},
                                      token=bound_token(cluster, good), pod_info=False)
    with pytest.raises(PublishFailed) as refused:
        await kubelet.publish_once(no_info)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "podInfoOnMount" in refused.value.message

    reviews = cluster.count("create", "tokenreviews")
    published = await kubelet.publish(good, "model", {"model": uri},
                                      token=bound_token(cluster, good))
    assert cluster.count("create", "tokenreviews") == reviews + 1
    seen = await asyncio.to_thread(read_as_pod, published.target)
    assert seen["files"] == {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}
    await kubelet.unpublish(published)
    log = (cluster_agent.log_dir / "agent-1.log").read_text()
    for token in ("forged-token", "builder-token", "api-audience-token"):
        assert token not in log


async def test_a_private_model_is_handed_only_to_namespaces_its_source_admits(
        cluster: FakeKubeApi, cluster_agent: AgentProcess, kubelet: Kubelet, hub: HubServer):
    """The credentials scope is in the key: each namespace's Secret is its own model
    directory, published only after a pull with that Secret (the blobs are shared)."""
    hub.create_repo("org/private", private=True)
    hub.commit("org/private", FILES, lfs=["weights.bin"])
    uri = "hf://org/private@main"
    for ns, hub_token in (*HUB_TOKENS.items(), ("team-c", "hf_a-token-the-hub-refuses")):
        cluster.cluster.create("namespaces", namespace(ns))
        cluster.cluster.create("secrets", secret("hub", ns, token=hub_token), ns)

    async def publish(ns: str, *, once: bool = False, **attributes: str) -> Published | None:
        p = make_pod(cluster, f"server-{os.urandom(3).hex()}", ns)
        volume = {"model": uri, **attributes}
        if once:
            kubelet.volume_dir(p, "model").mkdir(parents=True, exist_ok=True)
            await kubelet.publish_once(kubelet.publish_request(
                p, "model", volume, token=bound_token(cluster, p)))
            return None
        return await kubelet.publish(p, "model", volume, token=bound_token(cluster, p))

    owner = await publish("team-a", credentials="hub")
    assert owner is not None
    # team-b without credentials is the public scope: a pull without any, which the hub
    # refuses; team-c's Secret is its own scope, refused too. Nothing of team-a's is handed.
    for ns, attributes in (("team-b", {}), ("team-c", {"credentials": "hub"})):
        with pytest.raises(PublishFailed) as refused:
            await publish(ns, once=True, **attributes)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "the pull failed" in refused.value.message
        assert scoped(uri, namespace=ns, credentials=attributes.get("credentials")).key \
            in refused.value.message
    assert len(mounts_under(kubelet.root)) == 1
    # team-b's own token: its own directory, published after the hub accepted that token,
    # with the same blob as team-a's (the LFS sha256 the hub states: nothing downloaded)
    downloads = len([r for r in hub.log("resolve") if r.method == "GET"])
    admitted = await publish("team-b", credentials="hub")
    assert admitted is not None
    assert (admitted.target / "weights.bin").read_bytes() == FILES["weights.bin"]
    assert os.stat(admitted.target / "weights.bin").st_ino == \
        os.stat(owner.target / "weights.bin").st_ino
    assert len([r for r in hub.log("resolve") if r.method == "GET"]) == downloads
    asked_with = {r.authorization for r in hub.log("tree")}
    assert {f"Bearer {HUB_TOKENS['team-a']}", f"Bearer {HUB_TOKENS['team-b']}"} <= asked_with
    a_key = scoped(uri, namespace="team-a", credentials="hub").key
    b_key = scoped(uri, namespace="team-b", credentials="hub").key
    assert a_key != b_key
    store = cluster_agent.store / "models"
    assert {p.name for p in store.iterdir() if (p / "manifest.json").exists()} == {a_key, b_key}
    for published in (owner, admitted):
        await kubelet.unpublish(published)
    log = (cluster_agent.log_dir / "agent-1.log").read_text()
    for token in (*HUB_TOKENS.values(), "hf_a-token-the-hub-refuses"):
        assert token not in log
