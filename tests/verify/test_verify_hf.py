"""Signed models from the Hugging Face-compatible hub, through the agent's real pipeline:
signed -> ready and verified; every way a model can differ from its signature -> never
published, each with its own error naming the policy; a policy is part of the key."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from agent.index import FAILED, READY
from agent.settings import SourceSettings
from agent.store.trees import MANIFEST
from common.errors import PolicyError
from tests.servers.hfhub import HubServer
from tests.sources.conftest import Pipeline, PipelineFactory
from tests.verify.conftest import published, pull, verifications
from tests.verify.signing import CertChain, KeyPair, Signer, flip_byte


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "test"}',
        "model.safetensors": os.urandom(600_000),
        "tokenizer/vocab.json": b'{"a": 1, "b": 2}',
        "tokenizer/merges.txt": b"a b\n",
    }


async def hub_pipeline(verifying: PipelineFactory, hub: HubServer) -> Pipeline:
    p: Pipeline = await verifying(sources=SourceSettings(hf_endpoint=hub.base_url))
    return p


def publish(hub: HubServer, repo: str, files: dict[str, bytes]) -> str:
    hub.create_repo(repo)
    return hub.commit(repo, files, lfs=[p for p in files if p.endswith(".safetensors")])


async def test_signed_model_is_ready_and_verified(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    files = signer.with_key(model_files(), keys["release"])
    publish(hf_hub, "org/signed", files)
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/signed", "release")

    assert model.state == READY, model.error
    shown = model.to_json()["verified"]
    key_id = hashlib.sha256(keys["release"].public.read_bytes()).hexdigest()
    assert shown["policy"] == "release" and shown["method"] == "publicKey"
    assert shown["signer"] == f"key sha256:{key_id}"
    assert shown["time"].endswith("Z")
    gitattributes = hf_hub.files("org/signed")[".gitattributes"]
    assert p.tree(model) == {**files, ".gitattributes": gitattributes}
    on_disk = json.loads((p.store.models / model.key / MANIFEST).read_text())
    assert on_disk["verify"] == "release" and on_disk["verified"]["tree"] == on_disk["tree"]
    # every file's sha256 is in the manifest now: the LFS one as the hub stated it, the
    # small git files computed from their blobs once
    assert all(f["sha256"] for f in on_disk["files"] if f["path"] != "model.sig"
               and f["path"] != ".gitattributes")
    assert verifications(p, "passed") == 1


async def test_a_model_pulled_without_a_policy_has_no_verification(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    publish(hf_hub, "org/plain", signer.with_key(model_files(), keys["release"]))
    p = await hub_pipeline(verifying, hf_hub)
    plain = await pull(p, "hf://org/plain")
    verified = await pull(p, "hf://org/plain", "release")
    assert plain.state == verified.state == READY
    assert plain.key != verified.key, "the policy is part of the key"
    assert plain.to_json()["verified"] is None and verified.to_json()["verified"] is not None


@pytest.mark.parametrize("change, error", [
    ("flip", "content differs from the signed file: model.safetensors"),
    ("add", "not covered by the signature: extra.txt"),
    ("remove", "signed but missing from the model: tokenizer/merges.txt"),
], ids=["one-byte-flipped", "file-added", "file-removed"])
async def test_a_model_that_differs_from_its_signature_is_never_published(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair],
    change: str, error: str
) -> None:
    files = signer.with_key(model_files(), keys["release"])
    if change == "flip":  # after signing: the hub's own digests match the changed bytes
        files["model.safetensors"] = flip_byte(files["model.safetensors"], 4096)
    elif change == "add":
        files["extra.txt"] = b"not signed\n"
    else:
        del files["tokenizer/merges.txt"]
    publish(hf_hub, "org/changed", files)
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/changed", "release")

    assert model.state == FAILED
    assert model.error == f"verify policy 'release': {error}"
    assert model.error_reason == "verification"
    assert published(p, model) == [] and p.store.manifest(model.key) is None
    assert verifications(p, "failed") == 1 and verifications(p, "passed") == 0
    assert p.metrics.pull_failures.labels(reason="verification")._value.get() == 1


async def test_a_signature_by_another_key_is_refused(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    publish(hf_hub, "org/theirs", signer.with_key(model_files(), keys["stranger"]))
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/theirs", "release")

    assert model.state == FAILED and published(p, model) == []
    assert model.error is not None and model.error.startswith(
        "verify policy 'release': the signature does not verify: Key mismatch")


async def test_a_model_without_a_signature_is_refused(
    hf_hub: HubServer, verifying: PipelineFactory
) -> None:
    publish(hf_hub, "org/unsigned", model_files())
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/unsigned", "release")

    assert model.state == FAILED and published(p, model) == []
    assert model.error == "verify policy 'release': the model has no signature file model.sig"
    assert model.error_reason == "unsigned" and verifications(p, "unsigned") == 1


async def test_a_malformed_or_unknown_policy_is_refused_before_any_download(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    publish(hf_hub, "org/m", signer.with_key(model_files(), keys["release"]))
    p = await hub_pipeline(verifying, hf_hub)
    hf_hub.reset_log()

    with pytest.raises(PolicyError) as broken:
        await pull(p, "hf://org/m", "broken")
    with pytest.raises(PolicyError) as unknown:
        await pull(p, "hf://org/m", "nope")

    assert str(broken.value) == "verify policy 'broken': publicKey is not a PEM public key"
    assert str(unknown.value).startswith("verify policy 'nope' is not configured on this agent")

    assert hf_hub.log() == [] and len(p.index) == 0 and list(p.store.blobs) == []
    assert verifications(p, "policy") == 2


async def test_another_policy_is_checked_again_in_its_own_tree_sharing_the_blobs(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    publish(hf_hub, "org/shared", signer.with_key(model_files(), keys["release"]))
    p = await hub_pipeline(verifying, hf_hub)
    first = await pull(p, "hf://org/shared", "release")
    blobs, downloaded = p.blob_count(), p.pulled_bytes("hf")

    second = await pull(p, "hf://org/shared", "also-release")
    refused = await pull(p, "hf://org/shared", "stranger")

    assert first.key != second.key != refused.key
    assert second.state == READY and second.to_json()["verified"]["policy"] == "also-release"
    assert verifications(p, "passed") == 2, "checked again, not handed the first check"
    assert refused.state == FAILED and published(p, refused) == []
    assert p.blob_count() == blobs, "the same content is stored once"
    # the 600 kB LFS file is found by its stated sha256; only small git files come again
    assert p.pulled_bytes("hf") - downloaded < 10_000
    assert p.tree(first) == p.tree(second)


async def test_include_globs_verify_the_files_they_select(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    files = signer.with_key(model_files(), keys["release"])
    files["tokenizer/merges.txt"] = b"changed, but not selected\n"
    publish(hf_hub, "org/globs", files)
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/globs", "release", include=["*.json", "*.safetensors"])

    assert model.state == READY, model.error
    assert sorted(p.tree(model)) == ["config.json", "model.safetensors", "model.sig",
                                     "tokenizer/vocab.json"], "the signature comes along"
    changed = await pull(p, "hf://org/globs", "release", include=["tokenizer/*"])
    assert changed.state == FAILED and "tokenizer/merges.txt" in (changed.error or "")


async def test_certificate_chain_policy(
    hf_hub: HubServer, verifying: PipelineFactory, signer: Signer, corp_ca: CertChain,
    other_ca: CertChain
) -> None:
    publish(hf_hub, "org/corp", signer.with_certificate(model_files(), corp_ca))
    hf_hub.create_repo("org/other")
    hf_hub.commit("org/other", signer.with_certificate(model_files(), other_ca))
    p = await hub_pipeline(verifying, hf_hub)

    model = await pull(p, "hf://org/corp", "corp")
    other = await pull(p, "hf://org/other", "corp")

    assert model.state == READY, model.error
    assert model.to_json()["verified"]["signer"] == corp_ca.subject
    assert model.to_json()["verified"]["method"] == "certificateChain"
    assert other.state == FAILED and published(p, other) == []
    assert other.error is not None and other.error.startswith(
        "verify policy 'corp': the signature does not verify: unable to get local issuer")
