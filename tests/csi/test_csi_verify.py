"""A CSI volume that names a signature policy (``volumeAttributes.verify``, what the
webhook's csi mode passes from ``modelcache.io/verify``): mounted only once the model passed
that policy; a model the policy does not pass is never mounted (fail closed), an unknown or
malformed policy is a bad request. Models signed for real with ``model_signing``, served by
the HF-compatible hub, published by a real agent process over its CSI socket."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.csi.conftest import csi_args, mounts_under
from tests.csi.kubelet import Kubelet, Pod, PublishFailed
from tests.servers.agent import AgentProcess
from tests.servers.hfhub import HubServer
from tests.verify.conftest import keys, signer  # noqa: F401 (fixtures)
from tests.verify.signing import KeyPair, Signer

pytestmark = pytest.mark.slow  # a real agent process, models signed by the CLI


@pytest.fixture
def agent(tmp_path: Path, kubelet_root: Path, hf_hub: HubServer,
          keys: dict[str, KeyPair]) -> Iterator[AgentProcess]:  # noqa: F811
    config = (f"sources: {{hfEndpoint: {json.dumps(hf_hub.base_url)}}}\n"
              "verifyPolicies:\n"
              f"  release: {{publicKey: {keys['release'].public}}}\n"
              f"  other: {{publicKey: {keys['stranger'].public}}}\n")
    with AgentProcess(tmp_path / "store", log_dir=tmp_path / "logs", config=config,
                      extra_args=csi_args(tmp_path, kubelet_root)) as proc:
        yield proc


async def test_a_volume_is_mounted_only_with_a_model_its_policy_passed(
        tmp_path: Path, agent: AgentProcess, kubelet: Kubelet, hf_hub: HubServer,
        signer: Signer, keys: dict[str, KeyPair]) -> None:  # noqa: F811
    weights = os.urandom(200_000)
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", signer.with_key({"config.json": b"{}", "model.safetensors": weights},
                                           keys["release"]))

    published = await kubelet.publish(Pod(name="signed"), "model",
                                      {"model": "hf://org/m", "verify": "release"})
    assert (published.target / "model.safetensors").read_bytes() == weights
    assert (published.target / "model.sig").is_file()
    await kubelet.unpublish(published)

    # the same files under a policy whose key did not sign them: pulled and checked for that
    # policy (a key of its own), failed, and never mounted; kubelet is told why and retries
    with pytest.raises(PublishFailed) as failed:
        await kubelet.publish(Pod(name="stranger"), "model",
                              {"model": "hf://org/m", "verify": "other"}, deadline=5.0)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "verify policy 'other'" in failed.value.message, failed.value.message
    assert mounts_under(tmp_path) == []

    for policy, says in (("nope", "is not configured on this agent"),
                         ("No!", "is not a ConfigMap name")):
        with pytest.raises(PublishFailed) as failed:
            await kubelet.publish(Pod(name="bad"), "model",
                                  {"model": "hf://org/m", "verify": policy})
        assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert says in failed.value.message, failed.value.message
        assert mounts_under(tmp_path) == []
