"""Cross-source dedup: a shard stored from one source is not downloaded again when another
source states the same sha256 for it (HF LFS oid, OCI layer digest, S3 checksum)."""

from __future__ import annotations

import hashlib
import os

import pytest

from agent.settings import SourceSettings
from tests.servers import oci
from tests.servers.hfhub import HubServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Endpoint, upload_model
from tests.sources.conftest import PipelineFactory


@pytest.mark.slow
async def test_a_shard_from_hf_is_not_downloaded_again_from_oci_or_s3(
    hf_hub: HubServer, oci_registry: Registry, oci_repo: str, moto_s3: S3Endpoint,
    pipeline: PipelineFactory, no_aws_env: None,
) -> None:
    shard = os.urandom(3_000_000)
    hf_hub.create_repo("org/m", gitattributes=False)
    hf_hub.commit("org/m", {"model.safetensors": shard, "config.json": b'{"from": "hf"}'})
    oci_registry.client().push(
        oci.artifact({"weights/model.safetensors": shard, "config.json": b'{"from": "oci"}'}),
        oci_repo, "v1")
    uploaded = upload_model(moto_s3.client(), moto_s3.bucket, "m", {
        "model.safetensors": shard, "config.json": b'{"from": "s3"}'},
        checksum_sha256=["model.safetensors"])
    assert uploaded["model.safetensors"].sha256 == hashlib.sha256(shard).hexdigest()
    p = await pipeline(sources=SourceSettings(hf_endpoint=hf_hub.base_url,
                                              s3_endpoint=moto_s3.url))

    from_hf = await p.pull("hf://org/m")
    assert p.pulled_bytes("hf") == len(shard) + len(b'{"from": "hf"}')
    from_oci = await p.pull(oci_registry.ref(oci_repo, "v1"))
    from_s3 = await p.pull("s3://models/m", credentials={
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})

    assert p.pulled_bytes("oci") == len(b'{"from": "oci"}'), "the shard came from the store"
    assert p.pulled_bytes("s3") == len(b'{"from": "s3"}'), "the shard came from the store"
    assert p.tree(from_oci)["weights/model.safetensors"] == shard
    assert p.tree(from_s3)["model.safetensors"] == shard
    inodes = {(p.store.models / m.key / m.manifest.tree / path).stat().st_ino
              for m, path in ((from_hf, "model.safetensors"),
                              (from_oci, "weights/model.safetensors"),
                              (from_s3, "model.safetensors")) if m.manifest is not None}
    assert len(inodes) == 1, "one blob, linked into three trees"
    assert p.blob_count() == 4  # the shard and three configs
