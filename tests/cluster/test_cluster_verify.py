"""CachedModels with ``spec.verify``: the policy is the ConfigMap of that name in the
CachedModel's namespace (read through the fake apiserver by the real client); a model that
passes is reported with its signer in its NodeCache entry's ``verified`` (the CRD's schema
checks it) and a ``Pulled`` Event saying who signed; one that fails, or a policy that is
missing, is ``failed`` with a ``VerificationFailed`` Event, and nothing is published."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from common.reference import parse, policy_scope
from tests.cluster.conftest import AgentFactory, entry, reasons
from tests.cluster.test_cluster_auth import MODELS, init_pod
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import cached_model, namespace
from tests.servers.hfhub import HubServer
from tests.verify.signing import KeyPair, Signer

CM = "cachedmodels"
pytestmark = pytest.mark.slow  # models signed by the CLI, a pull per CachedModel


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, KeyPair]:
    return {name: KeyPair.make(tmp_path / "keys", name) for name in ("release", "stranger")}


def policy(name: str, key: KeyPair) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": {"publicKey": key.public.read_text()}}


def notes(api: FakeKubeApi, name: str) -> list[str]:
    return [e.get("message") or e.get("note") or "" for e in api.cluster.events(name)]


async def test_cachedmodel_verified_under_its_namespaces_configmap(
        api: FakeKubeApi, agent_factory: AgentFactory, hf_hub: HubServer,
        keys: dict[str, KeyPair], tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model.safetensors": os.urandom(200_000)}
    signer = Signer(tmp_path / "signing")
    hf_hub.create_repo("org/good")
    hf_hub.commit("org/good", signer.with_key(files, keys["release"]))
    hf_hub.create_repo("org/theirs")
    hf_hub.commit("org/theirs", signer.with_key(files, keys["stranger"]))
    c = api.cluster
    c.create("configmaps", policy("release", keys["release"]), "default")
    c.create(CM, cached_model("good", "hf://org/good", verify="release"), "default")
    c.create(CM, cached_model("theirs", "hf://org/theirs", verify="release"), "default")
    c.create(CM, cached_model("nopolicy", "hf://org/good", verify="nope"), "default")

    async with agent_factory("n1", hf_endpoint=hf_hub.base_url) as agent, \
            asyncio.timeout(20):
        await c.wait_until(lambda: entry(api, "good", "n1").get("state") == "ready")
        await c.wait_until(lambda: entry(api, "theirs", "n1").get("state") == "failed")
        await c.wait_until(lambda: entry(api, "nopolicy", "n1").get("state") == "failed")
        await c.wait_until(lambda: "Pulled" in reasons(api, "good")
                           and "VerificationFailed" in reasons(api, "theirs")
                           and "VerificationFailed" in reasons(api, "nopolicy"))

        good = entry(api, "good", "n1")
        key_id = hashlib.sha256(keys["release"].public.read_bytes()).hexdigest()
        assert good["verified"]["policy"] == "default/release"
        assert good["verified"]["signer"] == f"key sha256:{key_id}"
        assert any("signature verified under default/release" in n for n in notes(api, "good"))
        theirs = entry(api, "theirs", "n1")
        assert "verified" not in theirs
        assert theirs["message"].startswith(
            "verify policy 'default/release': the signature does not verify: Key mismatch")
        assert entry(api, "nopolicy", "n1")["message"] == (
            "verify policy 'default/nope': no ConfigMap nope in namespace default")
        key = parse("hf://org/theirs", verify=policy_scope("default", "release")).key
        assert not (agent.deps.store.root / "models" / key / "manifest.json").exists()
        verified = parse("hf://org/good", verify=policy_scope("default", "release")).key
        assert agent.index.get(verified).to_json()["verified"]["policy"] == "default/release"


async def test_an_init_container_gets_its_model_verified_under_its_namespaces_policy(
        api: FakeKubeApi, agent_factory: AgentFactory, hf_hub: HubServer,
        keys: dict[str, KeyPair], tmp_path: Path) -> None:
    """The pod names the policy; its init container's token asks with it (the scope is the
    pod's namespace), may not ask for the same model unverified (another key), and the
    policy is the ConfigMap of its own namespace, not another's of the same name."""
    signer = Signer(tmp_path / "signing")
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", signer.with_key({"config.json": b"{}"}, keys["release"]))
    api.cluster.create("namespaces", namespace("team-a"))
    api.cluster.create("configmaps", policy("release", keys["release"]), "team-a")
    api.cluster.create("configmaps", policy("release", keys["stranger"]), "default")
    token = init_pod(api, "web-0", "team-a", "hf://org/m",
                     **{"modelcache.io/verify": "release"})
    other = init_pod(api, "web-1", "default", "hf://org/m",
                     **{"modelcache.io/verify": "release"})
    async with agent_factory("n1", hf_endpoint=hf_hub.base_url) as agent:
        status, model = await agent.call("POST", MODELS, {"uri": "hf://org/m", "verify": "release"},
                                         token=token)
        assert status == 202, model
        assert model["key"] == parse("hf://org/m", verify="team-a/release").key
        status, model = await agent.call("GET", f"{MODELS}/{model['key']}?wait=20", token=token)
        assert model["state"] == "ready" and model["verified"]["policy"] == "team-a/release"

        status, reply = await agent.call("POST", MODELS, {"uri": "hf://org/m"}, token=token)
        assert status == 403 and "pod team-a/web-0" in reply["error"]

        status, theirs = await agent.call(
            "POST", MODELS, {"uri": "hf://org/m", "verify": "release"}, token=other)
        assert status == 202 and theirs["key"] != model["key"]
        status, theirs = await agent.call("GET", f"{MODELS}/{theirs['key']}?wait=20", token=other)
        assert theirs["state"] == "failed" and theirs["verified"] is None
        assert theirs["error"].startswith("verify policy 'default/release': the signature "
                                          "does not verify: Key mismatch")
