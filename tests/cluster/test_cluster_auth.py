"""The admin API in a cluster: TokenReview (401), this node's pods asking for their own
model, SubjectAccessReview for everyone else (403), and the cross-namespace rule checked
at a real (HF-compatible) source with each namespace's own credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from common.reference import parse, scoped
from tests.cluster.conftest import AUDIENCE, AgentFactory, entry, eventually
from tests.cluster.test_cluster_warm import serve_model
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model, namespace, pod, secret
from tests.servers.agent import InProcessAgent
from tests.servers.hfhub import HubServer
from tests.servers.nginx import ServedDir

CM = "cachedmodels"
MODELS = "/api/v1/models"


def init_pod(api: FakeKubeApi, name: str, ns: str, uri: str, node_name: str = "n1",
             token: str | None = None, **notes: str) -> str:
    """A pod whose annotations ask for ``uri`` and the projected token its init container
    would present (bound to the pod and its node, audience modelcache)."""
    if not api.cluster.exists("namespaces", ns):
        api.cluster.create("namespaces", namespace(ns))
    created = api.cluster.create("pods", pod(name, node_name, ns, annotations={
        "modelcache.io/model": uri, **notes}), ns)
    token = token or f"token-{ns}-{name}"
    api.auth.add_service_account_token(token, ns, "default", audiences=[AUDIENCE],
                                       pod=(name, created["metadata"]["uid"]), node=node_name)
    return token


def user_token(api: FakeKubeApi, ns: str, sa: str) -> str:
    if not api.cluster.exists("namespaces", ns):
        api.cluster.create("namespaces", namespace(ns))
    token = f"token-{ns}-{sa}"
    api.auth.add_service_account_token(token, ns, sa, audiences=[AUDIENCE])
    return token


async def test_tokens_the_cluster_does_not_accept_get_401(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    api.auth.add_service_account_token("api-audience-only", "default", "app")  # not ours
    for token in (None, "unknown-token", "api-audience-only"):
        for method, path, body in (("POST", MODELS, {"uri": uri}), ("GET", MODELS, None),
                                   ("DELETE", f"{MODELS}/{parse(uri).key}", None)):
            status, reply = await agent.call(method, path, token=token, body=body)
            assert status == 401, (token, method, path, reply)
            assert "token" in reply["error"]
    assert agent.index.get(parse(uri).key) is None
    # probes and metrics stay open to kubelet and Prometheus
    assert (await agent.call("GET", "/readyz"))[0] == 200


async def test_an_init_container_token_may_ensure_its_own_model(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri, other = serve_model(nginx_dir), serve_model(nginx_dir, "other.bin")
    ref = parse(uri, ["*.bin"])
    token = init_pod(api, "web-0", "team-b", uri, **{"modelcache.io/include": "*.bin"})

    status, model = await agent.call("POST", MODELS, {"uri": uri, "include": ["*.bin"]},
                                     token=token)
    assert status == 202, model
    assert model["key"] == ref.key
    status, reply = await agent.call("GET", f"{MODELS}/{ref.key}?wait=10", token=token)
    assert (status, reply["state"]) == (200, "ready")
    assert reply["in_use"]  # its pod holds it
    assert (await agent.call("GET", MODELS, token=token))[0] == 200  # this node's pods may read

    for body in ({"uri": other}, {"uri": uri},  # another model; the same without include
                 {"uri": uri, "include": ["*.bin"], "pin": True},
                 {"uri": uri, "include": ["*.bin"], "credentials": "someone-elses"}):
        status, reply = await agent.call("POST", MODELS, token=token, body=body)
        assert status == 403, (body, reply)
        assert "pod team-b/web-0" in reply["error"]
    status, _ = await agent.call("DELETE", f"{MODELS}/{ref.key}", token=token)
    assert status == 403
    assert api.count("create", "tokenreviews") == 1  # accepted once, remembered


@pytest.mark.slow
async def test_a_pod_of_another_node_is_not_one_of_ours(api: FakeKubeApi, agent: InProcessAgent,
                                                       nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    token = init_pod(api, "far", "team-b", uri, node_name="n2")
    assert (await agent.call("POST", MODELS, token=token, body={"uri": uri}))[0] == 403
    assert (await agent.call("GET", MODELS, token=token))[0] == 403
    # a token bound to a pod this node does not run (deleted, or forged name)
    stale = "token-stale"
    api.auth.add_service_account_token(stale, "team-b", "default", audiences=[AUDIENCE],
                                       pod=("gone", "uid-gone"), node="n1")
    assert (await agent.call("POST", MODELS, token=stale, body={"uri": uri}))[0] == 403


async def test_other_callers_need_a_subject_access_review_grant(
        api: FakeKubeApi, agent: InProcessAgent, nginx_dir: ServedDir):
    uri = serve_model(nginx_dir)
    key = parse(uri).key
    token = user_token(api, "team-a", "ops")
    user = "system:serviceaccount:team-a:ops"
    assert (await agent.call("POST", MODELS, token=token, body={"uri": uri}))[0] == 403
    assert (await agent.call("GET", MODELS, token=token))[0] == 403

    api.auth.allow(verbs=["create"], resources=["cachedmodels"], api_groups=["modelcache.io"],
                   users=[user], namespace="team-a")
    status, model = await agent.call("POST", MODELS, token=token, body={"uri": uri, "pin": True})
    assert status == 202 and model["pinned"]
    assert (await agent.call("GET", MODELS, token=token))[0] == 403  # create is not list
    assert (await agent.call("DELETE", f"{MODELS}/{key}?force=true", token=token))[0] == 403

    api.auth.allow(verbs=["list", "delete"], resources=["cachedmodels"],
                   api_groups=["modelcache.io"], users=[user])  # all namespaces
    assert (await agent.call("GET", MODELS, token=token))[0] == 200
    await eventually(agent, lambda: agent.index.get(key).state != "pulling")
    # deleting CachedModels is not evicting from node caches
    assert (await agent.call("DELETE", f"{MODELS}/{key}?force=true", token=token))[0] == 403
    assert (await agent.call("POST", "/api/v1/gc", token=token))[0] == 403
    api.auth.allow(verbs=["delete"], resources=["cachedmodels/cache"],
                   api_groups=["modelcache.io"], users=[user])
    assert (await agent.call("DELETE", f"{MODELS}/{key}?force=true", token=token))[0] == 200
    assert (await agent.call("POST", "/api/v1/gc", token=token))[0] == 200


@pytest.fixture
async def private_hub(hf_hub_factory: Callable[..., HubServer]) -> AsyncIterator[HubServer]:
    hub = hf_hub_factory(tokens={"tok-a", "tok-c"})
    hub.create_repo("org/private", private=True)
    hub.commit("org/private", {"config.json": b"{}", "model.safetensors": b"w" * 5000})
    hub.create_repo("org/public")
    hub.commit("org/public", {"config.json": b"{}"})
    yield hub


async def test_each_namespaces_credentials_are_a_directory_of_their_own(
        api: FakeKubeApi, agent_factory: AgentFactory, private_hub: HubServer):
    """One private URI, three namespaces with their own Secrets: three keys (directories),
    each published only once a pull with that namespace's own token passed at the hub."""
    uri = "hf://org/private@main"
    c = api.cluster
    for ns, tok in (("team-a", "tok-a"), ("team-b", "tok-wrong"), ("team-c", "tok-c")):
        c.create("namespaces", namespace(ns))
        c.create("secrets", secret("hf", ns, token=tok), ns)
    c.create(CM, cached_model("private", uri, "team-a", credentialsSecret="hf"), "team-a")
    key = {ns: scoped(uri, namespace=ns, credentials="hf").key
           for ns in ("team-a", "team-b", "team-c")}
    public = parse(uri).key
    assert len({*key.values(), public}) == 4
    async with agent_factory("n1", hf_endpoint=private_hub.base_url) as agent:
        async with asyncio.timeout(10):
            await c.wait_until(lambda: entry(api, "private", "n1", "team-a").get("state")
                               == "ready")
        models = agent.store_root / "models"

        async def ask(ns: str, name: str, **body: str) -> dict:
            notes = {"modelcache.io/credentials": body["credentials"]} if body else {}
            token = init_pod(api, name, ns, uri, **notes)
            status, reply = await agent.call("POST", MODELS, {"uri": uri, **body}, token=token)
            assert status == 202, reply
            status, reply = await agent.call("GET", f"{MODELS}/{reply['key']}?wait=10",
                                             token=token)
            return reply

        # team-b's wrong token, or none at all: their own keys, failed, nothing published
        for reply, k in ((await ask("team-b", "b1", credentials="hf"), key["team-b"]),
                         (await ask("team-b", "b2"), public)):
            assert (reply["key"], reply["state"]) == (k, "failed"), reply
            assert "tok-" not in reply["error"]
            assert not (models / k / "manifest.json").exists()
        # team-c's token works at the hub: its own directory, after its own pull
        reply = await ask("team-c", "c1", credentials="hf")
        assert (reply["key"], reply["state"]) == (key["team-c"], "ready")
        trees = {ns: agent.deps.store.trees.read_manifest(key[ns]) for ns in ("team-a", "team-c")}
        assert {m.credentials for m in trees.values()} == {"team-a/hf", "team-c/hf"}
        a_file, c_file = (models / key[ns] / trees[ns].tree / "model.safetensors"
                          for ns in ("team-a", "team-c"))
        assert a_file.stat().st_ino == c_file.stat().st_ino  # one blob: shared content
        asked_with = {r.authorization for r in private_hub.log()}
        assert {"Bearer tok-a", "Bearer tok-c", "Bearer tok-wrong"} <= asked_with
        # team-a's own pod: its CachedModel's directory, a hit
        reply = await ask("team-a", "a1", credentials="hf")
        assert (reply["key"], reply["state"]) == (key["team-a"], "ready")
        assert agent.deps.puller.sharing.checks == 0  # no model crossed a namespace


async def test_a_public_model_needs_no_check(api: FakeKubeApi, agent_factory: AgentFactory,
                                             private_hub: HubServer):
    uri = "hf://org/public@main"
    api.cluster.create(CM, cached_model("public", uri), "default")
    async with agent_factory("n1", hf_endpoint=private_hub.base_url) as agent:
        async with asyncio.timeout(10):
            await api.cluster.wait_until(lambda: entry(api, "public", "n1").get("state")
                                         == "ready")
        token = init_pod(api, "any", "team-z", uri)
        assert (await agent.call("POST", MODELS, token=token, body={"uri": uri}))[0] == 202
        assert agent.deps.puller.sharing.checks == 0
