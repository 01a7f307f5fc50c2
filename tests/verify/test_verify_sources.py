"""Signed models from nginx (a tar.gz of the signed directory) and from the docker-registry
(an OCI artifact, ``model.sig`` one more titled layer), through the agent's real pipeline."""

from __future__ import annotations

import io
import os
import tarfile

from agent.index import FAILED, READY
from tests.servers import oci
from tests.servers.nginx import ServedDir
from tests.servers.registry import Registry
from tests.sources.conftest import PipelineFactory
from tests.verify.conftest import published, pull, verifications
from tests.verify.signing import KeyPair, Signer, flip_byte


def model_files() -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "test"}',
            "weights/model.safetensors": os.urandom(400_000),
            "tokenizer.json": b'{"vocab": {}}'}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(f"./{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_signed_archive_from_nginx(
    nginx_dir: ServedDir, verifying: PipelineFactory, signer: Signer, keys: dict[str, KeyPair]
) -> None:
    files = signer.with_key(model_files(), keys["release"])
    (nginx_dir.path / "model.tar.gz").write_bytes(tar_gz(files))
    tampered = dict(files, **{"config.json": flip_byte(files["config.json"], 3)})
    (nginx_dir.path / "tampered.tar.gz").write_bytes(tar_gz(tampered))
    p = await verifying()

    model = await pull(p, nginx_dir.url("model.tar.gz"), "release")
    bad = await pull(p, nginx_dir.url("tampered.tar.gz"), "release")

    assert model.state == READY, model.error
    assert p.tree(model) == files
    assert model.to_json()["verified"]["policy"] == "release"
    assert bad.state == FAILED and published(p, bad) == []
    assert bad.error == ("verify policy 'release': content differs from the signed file: "
                         "config.json")


async def test_signed_oci_artifact_from_the_registry(
    oci_registry: Registry, oci_repo: str, verifying: PipelineFactory, signer: Signer,
    keys: dict[str, KeyPair]
) -> None:
    files = signer.with_key(model_files(), keys["release"])
    client = oci_registry.client()
    client.push(oci.artifact(files), oci_repo, "signed")
    unsigned = {k: v for k, v in files.items() if k != "model.sig"}
    client.push(oci.artifact(unsigned), oci_repo, "unsigned")
    p = await verifying()

    model = await pull(p, oci_registry.ref(oci_repo, "signed"), "release")
    stranger = await pull(p, oci_registry.ref(oci_repo, "signed"), "stranger")
    missing = await pull(p, oci_registry.ref(oci_repo, "unsigned"), "release")

    assert model.state == READY, model.error
    assert p.tree(model) == files
    assert stranger.state == FAILED and published(p, stranger) == []
    assert "Key mismatch" in (stranger.error or "")
    assert missing.state == FAILED and published(p, missing) == []
    assert missing.error == "verify policy 'release': the model has no signature file model.sig"
    assert (verifications(p, "passed"), verifications(p, "failed"),
            verifications(p, "unsigned")) == (1, 1, 1)
    # every layer's sha256 is stated by the registry: the check read no blob again
    manifest = model.manifest
    assert manifest is not None and all(f.sha256 for f in manifest.files)
