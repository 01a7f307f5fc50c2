"""``oci://`` against the real ``docker-registry`` (anonymous, basic auth, bearer tokens),
with artifacts pushed by skopeo and oras-py and modelcar images with tar / gzip / zstd
layers, through the real pipeline; hostile manifests from a static registry."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli.main import parser
from agent.config import agent_settings
from agent.egress import Egress
from agent.index import FAILED
from agent.settings import EgressSettings
from agent.sources import oci as oci_module
from agent.sources.control import Control
from agent.sources.oci import OciSource
from common.errors import NotAllowed, SourceAuthError
from common.reference import parse
from tests.servers import oci
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.registry import Registry, oras_push, serve_image, skopeo_copy
from tests.sources.conftest import PipelineFactory, files_named, read_tree

FILES = {
    "config.json": b'{"architectures": ["Test"]}',
    "model.safetensors": os.urandom(2_500_000),
    "tokenizer/vocab.json": b'{"a": 0}',
}


async def test_artifact_pushed_by_skopeo(
    oci_registry: Registry, oci_repo: str, tmp_path: Path, pipeline: PipelineFactory
) -> None:
    image = oci.artifact(FILES)
    skopeo_copy(image, oci_registry, oci_repo, "v1", tmp_path)
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert p.tree(model) == FILES
    assert model.manifest is not None and model.manifest.revision == image.digest
    digests = {f.path: f.sha256 for f in model.manifest.files}
    assert digests == {b.annotations[oci.TITLE]: b.digest[7:]  # type: ignore[index]
                       for b in image.blobs if b.annotations}

    pinned = await p.pull(oci_registry.ref(oci_repo, image.digest), include=["*.json"])
    assert p.tree(pinned) == {k: v for k, v in FILES.items() if k.endswith(".json")}


async def test_a_missing_tag_is_explained_by_the_registry(
    oci_registry: Registry, oci_repo: str, tmp_path: Path, pipeline: PipelineFactory
) -> None:
    skopeo_copy(oci.artifact(FILES), oci_registry, oci_repo, "v1", tmp_path)
    p = await pipeline()
    model = await p.pull(oci_registry.ref(oci_repo, "v2"), ok=False)
    assert model.state == FAILED and model.error is not None
    assert "not found (404)" in model.error
    assert "(the server says: MANIFEST_UNKNOWN: manifest unknown" in model.error


async def test_artifact_pushed_by_oras(
    oci_registry: Registry, oci_repo: str, tmp_path: Path, pipeline: PipelineFactory
) -> None:
    (tmp_path / "model.safetensors").write_bytes(FILES["model.safetensors"])
    (tmp_path / "config.json").write_bytes(FILES["config.json"])
    digest = oras_push(oci_registry, oci_repo, "v1",
                       [tmp_path / "model.safetensors", tmp_path / "config.json"])
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert model.manifest is not None and model.manifest.revision == digest
    assert p.tree(model) == {k: FILES[k] for k in ("model.safetensors", "config.json")}


async def test_modelcar_index_with_tar_gzip_zstd_layers(
    oci_registry: Registry, oci_repo: str, tmp_path: Path, pipeline: PipelineFactory
) -> None:
    car = oci.modelcar(FILES, layers=("tar", "gzip", "zstd"))
    other = oci.modelcar({"config.json": b"arm"}, layers=("gzip",))
    idx = oci.index((other, {"os": "linux", "architecture": "arm"}),
                    (car, {"os": "linux", "architecture": "amd64"}))
    skopeo_copy(idx, oci_registry, oci_repo, "v1", tmp_path)
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert p.tree(model) == FILES, "only /models, from every layer; the base layer skipped"
    assert model.manifest is not None and model.manifest.revision == idx.digest


async def test_later_layers_overlay_earlier_ones(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory
) -> None:
    big = os.urandom(400_000)
    car = oci.modelcar({"config.json": b"old", "w.bin": big}, layers=("gzip",),
                       extra_layers=[(oci.model_entries({"config.json": b"new"}), "tar")])
    oci_registry.client().push(car, oci_repo, "v1")
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert p.tree(model) == {"config.json": b"new", "w.bin": big}


async def test_whiteouts_in_later_layers_delete_from_earlier_ones(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory
) -> None:
    # as a container runtime would show /models: .wh.NAME deletes NAME (a file or a whole
    # directory) from the layers below, .wh..wh..opq empties its directory of them
    big = os.urandom(300_000)
    car = oci.modelcar(
        {"config.json": b"old", "w.bin": big, "sub/a.bin": b"a", "sub/b.bin": b"b",
         "gone/x.bin": b"x", "keep/k.bin": b"k"}, layers=("gzip",),
        extra_layers=[([
            oci.TarEntry("models/.wh.w.bin", b""),
            oci.TarEntry("models/.wh.gone", b""),
            oci.TarEntry("models/sub/", kind="dir"),
            oci.TarEntry("models/sub/.wh..wh..opq", b""),
            oci.TarEntry("models/sub/c.bin", b"c"),
            oci.TarEntry("models/.wh.never-there", b""),
            oci.TarEntry("etc/.wh.passwd", b""),
        ], "tar")])
    oci_registry.client().push(car, oci_repo, "v1")
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert p.tree(model) == {"config.json": b"old", "sub/c.bin": b"c", "keep/k.bin": b"k"}


async def test_basic_auth(
    oci_registry_factory: Callable[..., Registry], tmp_path: Path, pipeline: PipelineFactory
) -> None:
    reg = oci_registry_factory(users={"alice": "s3cret-pw"})
    image = oci.artifact(FILES)
    skopeo_copy(image, reg, "m/a", "v1", tmp_path)
    p = await pipeline()
    uri = reg.ref("m/a", "v1")

    anonymous = (await p.pull(uri, ok=False)).error
    assert anonymous is not None and "requires credentials" in anonymous
    wrong = (await p.pull(uri, ok=False, credentials={"username": "alice",
                                                      "password": "nope-x"})).error
    assert wrong is not None and "refused the credentials given" in wrong
    assert "nope-x" not in wrong and uri in wrong

    model = await p.pull(uri, credentials={"username": "alice", "password": "s3cret-pw"})
    assert p.tree(model) == FILES

    auth = base64.b64encode(b"alice:s3cret-pw").decode()
    docker_config = json.dumps({"auths": {f"http://{reg.address}": {"auth": auth}}})
    source = p.sources["oci"]
    resolved = await source.resolve(parse(uri), {".dockerconfigjson": docker_config})
    assert resolved.revision == image.digest
    await source.check_access(parse(uri), {".dockerconfigjson": docker_config})
    with pytest.raises(SourceAuthError, match="refused the credentials given"):
        await source.check_access(parse(uri), {"username": "alice", "password": "nope"})


async def test_bearer_token_with_realm_on_the_registry_host(
    oci_registry_factory: Callable[..., Registry], tmp_path: Path, pipeline: PipelineFactory
) -> None:
    reg = oci_registry_factory(token=True, token_users={"bob": "pw-bob"})
    assert reg.token is not None
    image = oci.artifact(FILES)
    skopeo_copy(image, reg, "m/a", "v1", tmp_path, user="bob", password="pw-bob")
    before = len(reg.token.log())
    p = await pipeline()
    creds = {"username": "bob", "password": "pw-bob"}

    model = await p.pull(reg.ref("m/a", "v1"), credentials=creds)

    assert p.tree(model) == FILES
    asked = reg.token.log()[before:]
    assert asked and all(e.query.get("scope") == "repository:m/a:pull" for e in asked)
    assert all(e.query.get("service") == reg.token.service for e in asked)

    source = p.sources["oci"]
    assert isinstance(source, OciSource)
    blob = next(f for f in (await source.resolve(parse(reg.ref("m/a", "v1")), creds)).files)
    first = await source.locate(blob, creds)
    renewed = await source.locate(blob, creds, refresh=True)
    assert renewed.headers["Authorization"] != first.headers["Authorization"]
    assert len(reg.token.log()) == before + len(asked) + 1, "a token only when renewed"


async def test_token_realm_on_another_host_only_when_allowed(
    oci_registry_factory: Callable[..., Registry], tmp_path: Path, pipeline: PipelineFactory
) -> None:
    reg = oci_registry_factory(token=True, realm_host="127.0.0.2")
    assert reg.token is not None
    image = oci.artifact(FILES)
    skopeo_copy(image, reg, "m/a", "v1", tmp_path)
    before = len(reg.token.log())
    strict = await pipeline(allow_hosts=("127.0.0.1",), store="strict")

    with pytest.raises(NotAllowed, match=r"sends token requests to 127\.0\.0\.2:\d+"):
        await strict.sources["oci"].resolve(parse(reg.ref("m/a", "v1")),
                                            {"username": "u", "password": "pw-never-sent"})
    assert len(reg.token.log()) == before, "no request reached the other host"

    allowed = await pipeline(store="allowed")  # 127.0.0.2 listed by the admin
    model = await allowed.pull(reg.ref("m/a", "v1"))
    assert allowed.tree(model) == FILES
    assert any(e.host.startswith("127.0.0.2:") for e in reg.token.log()[before:])


@pytest.mark.parametrize(
    ("titles", "expected"),
    [
        (["../escape.bin"], "'..'"),
        (["/etc/escape.bin"], "absolute"),
        (["nul\x00escape.bin"], "NUL"),
        (["escape.bin", "escape.bin"], "twice"),
    ],
)
async def test_hostile_titles_refused(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory, tmp_path: Path,
    titles: list[str], expected: str,
) -> None:
    client = oci_registry.client()
    blob = oci.Blob(b"pwned", "application/octet-stream")
    cfg = oci.Blob(b"{}", oci.MT_EMPTY)
    client.push_blob(oci_repo, blob)
    client.push_blob(oci_repo, cfg)
    layers = [dict(blob.descriptor(), annotations={oci.TITLE: t}) for t in titles]
    doc = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": cfg.descriptor(),
           "layers": layers}
    m = oci.raw_manifest(doc)
    assert client.put_manifest(oci_repo, "evil", m.manifest, m.media_type).status == 201
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "evil"), ok=False)

    assert model.state == FAILED and expected in str(model.error)
    assert "layer title" in str(model.error)
    assert not files_named(tmp_path, "escape.bin") and p.blob_count() == 0


@pytest.mark.parametrize("name", sorted(oci.HOSTILE_TARS))
async def test_hostile_tar_layers_refused(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory, tmp_path: Path,
    name: str,
) -> None:
    car = oci.modelcar({"config.json": b"{}"}, layers=("tar",),
                       extra_layers=[(oci.HOSTILE_TARS[name], "tar")])
    oci_registry.client().push(car, oci_repo, "v1")
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"), ok=False)

    assert model.state == FAILED and "archive member" in str(model.error)
    for leaked in ("escape.txt", "pwned.txt", "abs.txt", "evil"):
        assert not files_named(tmp_path, leaked)
    assert not (Path("/tmp") / "pwned.txt").exists()
    assert not list((p.store.models / model.key).glob("t-*"))


async def test_hostile_manifests_from_a_static_registry(
    faulty: FaultyServer, pipeline: PipelineFactory
) -> None:
    blob = oci.Blob(b"x", "application/octet-stream")
    cfg = oci.Blob(b"{}", oci.MT_EMPTY)
    base = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": cfg.descriptor()}

    def served(name: str, layers: list[dict[str, object]]) -> str:
        return serve_image(faulty, f"m/{name}", "v1",
                           oci.raw_manifest({**base, "layers": layers}, blobs=[cfg, blob]))

    titled = dict(blob.descriptor(), annotations={oci.TITLE: "f"})
    cases = {
        served("huge", [titled] * 100_000): "more than 4194304 bytes",
        served("many", [titled] * 10_001): "10001 layers; more than 10000",
        served("malformed", [{**titled, "digest": "sha256:xyz"}]): "malformed digest",
        served("upper", [{**titled, "digest": "sha256:" + "A" * 64}]): "malformed digest",
        served("sha512", [{**titled, "digest": "sha512:" + "0" * 128}]): "uses sha512",
        served("nosize", [{**titled, "size": -1}]): "no valid size",
        served("foreign", [blob.descriptor()]): "is not a tar layer",
    }
    p = await pipeline()
    for uri, expected in cases.items():
        model = await p.pull(uri, ok=False)
        assert model.state == FAILED and expected in str(model.error), (uri, model.error)
    assert p.blob_count() == 0


async def test_manifest_and_blob_digests_are_verified(
    faulty: FaultyServer, pipeline: PipelineFactory
) -> None:
    image = oci.artifact({"w.bin": os.urandom(300_000)})
    uri = serve_image(faulty, "m/a", "v1", image)
    address = uri.split("://")[1].split("/")[0]
    faulty.add("/v2/m/a/manifests/v2", image.manifest, content_type=image.media_type,
               extra_headers={"Docker-Content-Digest": "sha256:" + "0" * 64})
    other = "sha256:" + "1" * 64
    faulty.add(f"/v2/m/a/manifests/{other}", image.manifest, content_type=image.media_type)
    layer = next(b for b in image.blobs if b.annotations)
    faulty.always(f"/v2/m/a/blobs/{layer.digest}", Fault(corrupt_at=1000))
    p = await pipeline()

    lying = await p.pull(f"oci://{address}/m/a:v2", ok=False)
    assert "the registry says the manifest is sha256:000" in str(lying.error)
    swapped = await p.pull(f"oci://{address}/m/a@{other}", ok=False)
    assert f"manifest {other} has the digest {image.digest}" in str(swapped.error)
    corrupt = await p.pull(uri, ok=False)
    assert "w.bin" in str(corrupt.error) and "sha256" in str(corrupt.error)
    assert p.blob_count() == 0


async def test_blob_redirect_to_storage_drops_the_credentials(
    faulty: FaultyServer, faulty_factory: Callable[..., FaultyServer],
    pipeline: PipelineFactory,
) -> None:
    image = oci.artifact({"w.bin": os.urandom(300_000)})
    uri = serve_image(faulty, "m/a", "v1", image)
    storage = faulty_factory("127.0.0.2")
    layer = next(b for b in image.blobs if b.annotations)
    storage.add("/bucket/w", layer.data)
    faulty.always(f"/v2/m/a/blobs/{layer.digest}", Fault(redirect=storage.url("/bucket/w")))
    faulty.fault("/v2/m/a/manifests/v1", Fault(
        status=401, headers={"WWW-Authenticate": 'Basic realm="registry"'}))
    p = await pipeline()

    model = await p.pull(uri, credentials={"username": "u", "password": "pw"})

    assert p.tree(model) == {"w.bin": layer.data}
    assert all(r.authorization and r.authorization.startswith("Basic ")
               for r in faulty.gets(f"/v2/m/a/blobs/{layer.digest}"))
    assert storage.gets("/bucket/w") and all(
        r.authorization is None for r in storage.gets("/bucket/w"))


async def test_moved_tag_is_a_new_tree_after_the_refresh_interval(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory
) -> None:
    client = oci_registry.client()
    first = oci.artifact(FILES)
    client.push(first, oci_repo, "latest")
    p = await pipeline(refresh_interval=0.0)
    model = await p.pull(f"oci://{oci_registry.address}/{oci_repo}")
    assert model.manifest is not None and model.manifest.revision == first.digest
    old_tree = p.store.models / model.key / model.manifest.tree

    second = oci.artifact({**FILES, "config.json": b'{"v": 2}'})
    client.push(second, oci_repo, "latest")
    await p.refresh(model)

    assert model.manifest.revision == second.digest
    assert p.tree(model)["config.json"] == b'{"v": 2}'
    assert read_tree(old_tree) == FILES and old_tree.name in model.manifest.previous



def test_plain_http_only_for_loopback_and_listed_registries(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text('ociPlainHttp: ["registry.internal:5000", "mirror.corp"]\n')
    args = parser().parse_args(["agent", "--config", str(config), "--store", str(tmp_path)])
    settings = agent_settings(args)
    assert settings.sources.oci_plain_http == ("registry.internal:5000", "mirror.corp")

    control = Control(Egress(EgressSettings()))
    source = OciSource(control, settings.sources.oci_plain_http)
    assert source._base("registry.internal:5000") == "http://registry.internal:5000"
    assert source._base("registry.internal:5001") == "https://registry.internal:5001"
    assert source._base("mirror.corp:8443") == "http://mirror.corp:8443"
    assert source._base("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert source._base("[::1]:5000") == "http://[::1]:5000"
    assert source._base("localhost") == "http://localhost"
    assert source._base("ghcr.io") == "https://ghcr.io"


def test_docker_hub_is_reached_as_container_runtimes_reach_it() -> None:
    """``oci://docker.io/ai/smollm2:latest``: the API at registry-1.docker.io, tokens from
    auth.docker.io (for Docker Hub only), official images under library/, and the
    credentials ``docker login`` files under https://index.docker.io/v1/. (Docker Hub is
    not reachable here: the realm rule and the token dance themselves are tested against
    the real registry above, with its token service on another host.)"""
    source = OciSource(Control(Egress(EgressSettings())))
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert source._base(name) == "https://registry-1.docker.io"
    shown = "oci://docker.io/ai/smollm2:latest"
    source._check_realm("docker.io", "https://auth.docker.io/token", shown)  # followed
    with pytest.raises(NotAllowed, match=r"auth\.docker\.io:443, which is not the registry"):
        source._check_realm("ghcr.io", "https://auth.docker.io/token", "oci://ghcr.io/m:1")
    with pytest.raises(NotAllowed, match="plain http for an https registry"):
        source._check_realm("docker.io", "http://auth.docker.io/token", shown)
    with pytest.raises(NotAllowed, match=r"evil\.example"):
        source._check_realm("docker.io", "https://evil.example/token", shown)

    assert oci_module._repository("docker.io", "ubuntu") == "library/ubuntu"
    assert oci_module._repository("docker.io", "ai/smollm2") == "ai/smollm2"
    assert oci_module._repository("ghcr.io", "ubuntu") == "ubuntu"

    login = base64.b64encode(b"me:dckr_pat_x").decode()
    config = json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": login}}})
    assert oci_module._basic({".dockerconfigjson": config}, "docker.io") == ("me", "dckr_pat_x")
    assert oci_module._basic({".dockerconfigjson": config}, "ghcr.io") is None


async def test_docker_v2_list_and_manifest_with_an_attestation_entry(
    oci_registry: Registry, oci_repo: str, pipeline: PipelineFactory
) -> None:
    files = {"config.json": b"{}", "w.bin": os.urandom(200_000)}
    layer, diff_id = oci.tar_layer(oci.model_entries(files), "gzip")
    layer = oci.Blob(layer.data, "application/vnd.docker.image.rootfs.diff.tar.gzip")
    config = oci.Blob(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [diff_id]}}).encode(),
        "application/vnd.docker.container.image.v1+json")
    docker = "application/vnd.docker.distribution.manifest.v2+json"
    image = oci.raw_manifest({"schemaVersion": 2, "mediaType": docker,
                              "config": config.descriptor(), "layers": [layer.descriptor()]},
                             blobs=[config, layer], media_type=docker)
    attestation = oci.artifact({"sbom.json": b"{}"})
    listing = "application/vnd.docker.distribution.manifest.list.v2+json"
    top = oci.raw_manifest({"schemaVersion": 2, "mediaType": listing, "manifests": [
        attestation.descriptor({"os": "unknown", "architecture": "unknown"}),
        image.descriptor({"os": "linux", "architecture": "s390x"})]}, media_type=listing)
    top = oci.Image(top.manifest, listing, (), (attestation, image))
    oci_registry.client().push(top, oci_repo, "v1")
    p = await pipeline()

    model = await p.pull(oci_registry.ref(oci_repo, "v1"))

    assert p.tree(model) == files, "the only image, not the attestation"
    assert model.manifest is not None and model.manifest.revision == top.digest
