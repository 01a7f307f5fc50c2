"""The real docker-registry with the content modelcache pulls, pushed the ways users push.

Reads go through real clients too: skopeo copies back to an OCI layout, oras-py pulls
artifacts by title.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import oras.client
import pytest
import zstandard

from tests.servers import oci
from tests.servers.faulty import FaultyServer
from tests.servers.net import fetch, tls_client_context
from tests.servers.registry import (
    SKOPEO,
    Registry,
    oras_push,
    serve_image,
    skopeo_copy,
)

FILES = {
    "config.json": b'{"architectures": ["Test"]}',
    "model.safetensors": os.urandom(200_000),
    "tokenizer/vocab.json": b'{"a": 0}',
}


def skopeo_pull(registry: Registry, ref: str, dest: Path) -> dict[str, object]:
    """Copy ``ref`` back to an OCI layout with skopeo; the layout's index.json."""
    out = subprocess.run(
        [
            SKOPEO, "copy", "--all", "--preserve-digests", "--quiet", "--src-tls-verify=false",
            f"docker://{registry.address}/{ref}", f"oci:{dest}:pulled",
        ],
        capture_output=True, text=True, timeout=120, check=False, env={"HOME": str(dest.parent)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads((dest / "index.json").read_text()))


def test_artifact_by_skopeo_read_back_by_oras(
    oci_registry: Registry, oci_repo: str, tmp_path: Path
) -> None:
    image = oci.artifact(FILES)
    assert skopeo_copy(image, oci_registry, oci_repo, "v1", tmp_path) == image.digest
    got = oci_registry.client().get_manifest(oci_repo, "v1")
    assert got.status == 200 and got.body == image.manifest
    assert got.headers["Docker-Content-Digest"] == image.digest
    titles = [layer["annotations"][oci.TITLE] for layer in got.json()["layers"]]
    assert titles == list(FILES)

    client = oras.client.OrasClient(hostname=oci_registry.address, insecure=True)
    client.pull(target=f"{oci_registry.address}/{oci_repo}:v1", outdir=str(tmp_path / "o"))
    for path, data in FILES.items():
        assert (tmp_path / "o" / path).read_bytes() == data

    index = skopeo_pull(oci_registry, f"{oci_repo}:v1", tmp_path / "back")
    assert index["manifests"][0]["digest"] == image.digest  # type: ignore[index]


def test_blob_ranges(oci_registry: Registry, oci_repo: str) -> None:
    image = oci.artifact(FILES)
    oci_registry.client().push(image, oci_repo, "v1")
    layer = image.blobs[2]
    r = fetch(
        f"{oci_registry.base_url}/v2/{oci_repo}/blobs/{layer.digest}",
        headers={"Range": "bytes=100-199"},
    )
    assert r.status == 206 and r.body == layer.data[100:200]


def test_oras_push_shapes(oci_registry: Registry, oci_repo: str, tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_bytes(b"{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    digest = oras_push(
        oci_registry, oci_repo, "v1", [tmp_path / "model.safetensors", tmp_path / "tokenizer"]
    )
    got = oci_registry.client().get_manifest(oci_repo, "v1")
    assert got.headers["Docker-Content-Digest"] == digest
    layers = got.json()["layers"]
    assert [(la["mediaType"], la["annotations"][oci.TITLE]) for la in layers] == [
        (oci.MT_TAR, "model.safetensors"),
        (oci.MT_TAR_GZIP, "tokenizer"),
    ]


def _members(blob: oci.Blob) -> dict[str, bytes | None]:
    raw = blob.data
    if blob.media_type == oci.MT_TAR_GZIP:
        raw = gzip.decompress(raw)
    elif blob.media_type == oci.MT_TAR_ZSTD:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {
            m.name: (tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def test_modelcar_and_index(oci_registry: Registry, oci_repo: str, tmp_path: Path) -> None:
    car = oci.modelcar(FILES, layers=("tar", "gzip", "zstd"))
    idx = oci.index((car, {"os": "linux", "architecture": "amd64"}))
    assert skopeo_copy(idx, oci_registry, oci_repo, "v1", tmp_path) == idx.digest
    client = oci_registry.client()
    top = client.get_manifest(oci_repo, "v1")
    assert top.headers["Content-Type"] == oci.MT_INDEX and top.body == idx.manifest
    child = client.get_manifest(oci_repo, top.json()["manifests"][0]["digest"])
    assert child.body == car.manifest
    media = [la["mediaType"] for la in child.json()["layers"]]
    assert media == [oci.MT_TAR_GZIP, oci.MT_TAR, oci.MT_TAR_GZIP, oci.MT_TAR_ZSTD]

    found: dict[str, bytes] = {}
    for desc in child.json()["layers"]:
        r = fetch(f"{oci_registry.base_url}/v2/{oci_repo}/blobs/{desc['digest']}")
        assert oci.sha256_digest(r.body) == desc["digest"]
        members = _members(oci.Blob(r.body, desc["mediaType"]))
        found.update({k: v for k, v in members.items() if v is not None})
    assert {k.removeprefix("models/"): v for k, v in found.items() if k.startswith("models/")} == (
        FILES
    )
    assert "bin/busybox" in found  # the base layer a puller must skip


def test_basic_auth_and_tls(oci_registry_factory: Callable[..., Registry], tmp_path: Path) -> None:
    reg = oci_registry_factory(users={"alice": "s3cret"}, tls=True)
    assert reg.base_url.startswith("https://")
    assert reg.ca is not None
    ctx = tls_client_context(reg.ca.cert_pem.bytes())
    image = oci.artifact(FILES)
    assert skopeo_copy(image, reg, "m/a", "v1", tmp_path) == image.digest
    anon = fetch(f"{reg.base_url}/v2/m/a/manifests/v1", tls=ctx)
    assert anon.status == 401 and anon.headers["WWW-Authenticate"].startswith("Basic ")
    assert reg.client("alice", "wrong").get_manifest("m/a", "v1").status == 401
    assert reg.client().get_manifest("m/a", "v1").body == image.manifest


def test_token_auth_with_realm_on_another_host(
    oci_registry_factory: Callable[..., Registry], tmp_path: Path
) -> None:
    reg = oci_registry_factory(token=True, realm_host="127.0.0.2", token_users={"bob": "pw"})
    assert reg.token is not None
    image = oci.artifact(FILES)
    skopeo_copy(image, reg, "m/a", "v1", tmp_path, user="bob", password="pw")
    anon = fetch(f"{reg.base_url}/v2/m/a/manifests/v1")
    challenge = anon.headers["WWW-Authenticate"]
    assert anon.status == 401 and challenge.startswith("Bearer ")
    assert 'realm="http://127.0.0.2:' in challenge and 'scope="repository:m/a:pull"' in challenge
    assert reg.client("bob", "pw").get_manifest("m/a", "v1").body == image.manifest
    assert any(e.host.startswith("127.0.0.2:") for e in reg.token.log())
    with pytest.raises(RuntimeError, match="401"):
        reg.client("bob", "nope").get_manifest("m/a", "v1")


def test_hostile_manifests(oci_registry: Registry, oci_repo: str) -> None:
    client = oci_registry.client()
    blob = oci.Blob(b"x", "application/octet-stream")
    cfg = oci.Blob(b"{}", oci.MT_EMPTY)
    client.push_blob(oci_repo, blob)
    client.push_blob(oci_repo, cfg)

    def put(layers: list[dict[str, object]], ref: str) -> int:
        doc = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": cfg.descriptor()}
        doc["layers"] = layers
        m = oci.raw_manifest(doc)
        return client.put_manifest(oci_repo, ref, m.manifest, m.media_type).status

    def titled(*titles: str) -> list[dict[str, object]]:
        return [dict(blob.descriptor(), annotations={oci.TITLE: t}) for t in titles]

    # annotations are not validated: hostile titles are stored and served as pushed
    assert put(titled("../escape"), "dotdot") == 201
    assert put(titled("/etc/abs"), "absolute") == 201
    assert put(titled("nul\x00byte"), "nul") == 201
    assert put(titled("dup", "dup"), "dup") == 201
    assert client.get_manifest(oci_repo, "nul").json()["layers"][0]["annotations"] == {
        oci.TITLE: "nul\x00byte"
    }
    # digests are: malformed or unknown algorithms never reach a puller from this registry
    for digest in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64):
        bad = {"mediaType": "application/octet-stream", "digest": digest, "size": 1}
        assert put([bad], "bad-digest") in (400, 500)
    # a valid digest of another algorithm is accepted: a sha256-only puller must refuse it
    data = b"sha512 content"
    d512 = "sha512:" + hashlib.sha512(data).hexdigest()
    client.push_blob(oci_repo, data, digest=d512)
    layer = {"mediaType": "application/octet-stream", "digest": d512, "size": len(data)}
    assert put([{**layer, "annotations": {oci.TITLE: "f"}}], "sha512") == 201
    assert fetch(f"{oci_registry.base_url}/v2/{oci_repo}/blobs/{d512}").body == data
    # a manifest body over 4 MiB is refused ("http: request body too large")
    many = [blob.descriptor() for _ in range(50_000)]
    assert put(many, "too-many") == 400


def test_static_registry_serves_what_distribution_refuses(faulty: FaultyServer) -> None:
    blob = oci.Blob(b"x", "application/octet-stream")
    cfg = oci.Blob(b"{}", oci.MT_EMPTY)
    desc = blob.descriptor()
    layers = [{**desc, "annotations": {oci.TITLE: f"f{i}"}} for i in range(100_000)]
    layers.append({"mediaType": "application/octet-stream", "digest": "sha256:xyz", "size": 1})
    doc = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": cfg.descriptor()}
    image = oci.raw_manifest({**doc, "layers": layers}, blobs=[cfg, blob])
    ref = serve_image(faulty, "m/huge", "v1", image)
    assert ref == f"oci://{faulty.base_url.split('://')[1]}/m/huge:v1"
    got = fetch(faulty.url("/v2/m/huge/manifests/v1"))
    assert got.status == 200 and got.body == image.manifest
    assert got.headers["Docker-Content-Digest"] == image.digest
    assert len(image.manifest) > 4 << 20
    assert fetch(faulty.url(f"/v2/m/huge/blobs/{blob.digest}")).body == b"x"


@pytest.mark.parametrize("name", sorted(oci.HOSTILE_TARS))
def test_hostile_tar_layers_are_stored(oci_registry: Registry, oci_repo: str, name: str) -> None:
    car = oci.modelcar(
        {"config.json": b"{}"}, layers=("tar",), extra_layers=[(oci.HOSTILE_TARS[name], "tar")]
    )
    oci_registry.client().push(car, oci_repo, name)
    layer = car.blobs[-1]
    r = fetch(f"{oci_registry.base_url}/v2/{oci_repo}/blobs/{layer.digest}")
    assert r.body == layer.data
    with tarfile.open(fileobj=io.BytesIO(r.body)) as tar:
        names = [m.name for m in tar.getmembers()]
    assert names == [e.name.rstrip("/") for e in oci.HOSTILE_TARS[name]]
