"""``model-registry://`` against the local Kubeflow Model Registry (proven faithful by the
real ``model-registry`` client in ``tests/servers/test_modelregistry.py``), whose artifacts
point at the local hub, moto and the docker-registry; through the real pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.index import FAILED
from agent.settings import SourceSettings
from common.errors import SourceAuthError, SourceError, SourceNotFound
from common.reference import parse
from tests.servers import oci
from tests.servers.hfhub import HubServer
from tests.servers.modelregistry import ModelRegistryServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Endpoint, upload_model
from tests.sources.conftest import PipelineFactory

FILES = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(300_000)}


async def test_version_pulled_from_its_hf_artifact_and_both_uris_recorded(
    model_registry_factory: Callable[..., ModelRegistryServer],
    hf_hub_factory: Callable[..., HubServer], pipeline: PipelineFactory,
) -> None:
    hub = hf_hub_factory(tokens={"hf-secret"})
    hub.create_repo("org/iris", private=True)
    sha = hub.commit("org/iris", FILES)
    registry = model_registry_factory(token="mr-secret")
    registry.register("iris", "v1", "hf://org/iris@main")
    p = await pipeline(sources=SourceSettings(hf_endpoint=hub.base_url))
    uri = f"model-registry://{registry.host_port}/iris/v1"

    model = await p.pull(uri, include=["*.safetensors", "*.json"],
                         credentials={"token": "mr-secret", "hf_token": "hf-secret"})

    assert p.tree(model) == FILES
    assert model.manifest is not None
    assert model.manifest.uri == uri and model.manifest.source_uri == "hf://org/iris@main"
    assert model.manifest.revision == sha
    on_disk = json.loads((p.store.models / model.key / "manifest.json").read_text())
    assert on_disk["uri"] == uri and on_disk["source_uri"] == "hf://org/iris@main"
    assert {e.authorization for e in registry.log()} == {"Bearer mr-secret"}
    hub_requests = hub.log("info") + hub.log("tree") + hub.log("resolve")
    assert {r.authorization for r in hub_requests} == {"Bearer hf-secret"}, \
        "the registry's token never reaches the hub"
    source = p.sources["model-registry"]
    await source.check_access(parse(uri), {"token": "mr-secret", "hf_token": "hf-secret"})
    with pytest.raises(SourceAuthError, match="401"):
        await source.check_access(parse(uri), {"token": "mr-secret"})


async def test_default_host_and_an_s3_artifact(
    model_registry: ModelRegistryServer, moto_s3: S3Endpoint, pipeline: PipelineFactory,
    no_aws_env: None,
) -> None:
    upload_model(moto_s3.client(), moto_s3.bucket, "iris/v2", FILES)
    model_registry.register("iris", "v2", "s3://models/iris/v2/")
    p = await pipeline(sources=SourceSettings(model_registry=model_registry.host_port,
                                              s3_endpoint=moto_s3.url))

    model = await p.pull("model-registry://iris/v2", credentials={
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})

    assert p.tree(model) == FILES
    assert model.manifest is not None and model.manifest.source_uri == "s3://models/iris/v2"
    assert model.manifest.revision.startswith("etags:")
    assert p.pulled_bytes("model-registry") == sum(len(v) for v in FILES.values())


@pytest.mark.slow
async def test_an_oci_artifact_registered_by_the_real_client(
    model_registry: ModelRegistryServer, oci_registry: Registry, oci_repo: str,
    pipeline: PipelineFactory, tmp_path: Path,
) -> None:
    image = oci.artifact(FILES)
    oci_registry.client().push(image, oci_repo, "v3")
    artifact_uri = oci_registry.ref(oci_repo, "v3")
    host, port = model_registry.host_port.split(":")
    script = (
        "import sys, warnings\nwarnings.simplefilter('ignore')\n"
        "from model_registry import ModelRegistry\n"
        "r = ModelRegistry(sys.argv[1], int(sys.argv[2]), author='t', is_secure=False)\n"
        "r.register_model('granite', sys.argv[3], version='v3', model_format_name='safetensors',"
        " model_format_version='1')\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run([sys.executable, "-c", script, f"http://{host}", port, artifact_uri],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    p = await pipeline()

    model = await p.pull(f"model-registry://{model_registry.host_port}/granite/v3")

    assert p.tree(model) == FILES
    assert model.manifest is not None and model.manifest.revision == image.digest
    assert model.manifest.source_uri == artifact_uri


async def test_the_model_artifact_is_found_past_the_first_page(
    model_registry: ModelRegistryServer, hf_hub_factory: Callable[..., HubServer],
    pipeline: PipelineFactory,
) -> None:
    # a version whose first 150 model artifacts carry no URI (metadata-only records):
    # the agent reads on, page by page, to the oldest one that has one
    hub = hf_hub_factory()
    hub.create_repo("org/iris")
    hub.commit("org/iris", FILES)
    _, version, _ = model_registry.register("iris", "v4", "")
    for i in range(149):
        model_registry.add_artifact(version, name=f"note-{i}")
    model_registry.add_artifact(version, name="weights", uri="hf://org/iris@main")
    model_registry.add_artifact(version, name="later", uri="hf://org/other@main")
    p = await pipeline(sources=SourceSettings(hf_endpoint=hub.base_url,
                                              model_registry=model_registry.host_port))

    model = await p.pull("model-registry://iris/v4", include=["*.safetensors", "*.json"])

    assert p.tree(model) == FILES
    assert model.manifest is not None and model.manifest.source_uri == "hf://org/iris@main"
    pages = [e for e in model_registry.log() if e.path.endswith("/artifacts")]
    assert len(pages) == 2, "two pages of 100 read, no more"


async def test_lookups_that_fail_say_what_is_missing(
    model_registry_factory: Callable[..., ModelRegistryServer], pipeline: PipelineFactory,
) -> None:
    registry = model_registry_factory(token="mr-secret")
    registry.register("iris", "v1", "pvc://claim/iris")
    registry.register("iris", "loop", "model-registry://iris/v1")
    registry.register("iris", "bad", "ftp://example/x")
    p = await pipeline()
    source = p.sources["model-registry"]
    host = registry.host_port
    token = {"token": "mr-secret"}

    cases: list[tuple[str, dict[str, str] | None, type[Exception], str]] = [
        ("nope/v1", token, SourceNotFound, "no registered model 'nope'"),
        ("iris/v9", token, SourceNotFound, "has no version 'v9'"),
        ("iris/v1", None, SourceAuthError, "refused anonymous access"),
        ("iris/v1", {"token": "wrong"}, SourceAuthError, "refused the token given"),
        ("iris/v1", token, SourceError, "points at pvc://"),
        ("iris/loop", token, SourceError, "points at model-registry://"),
        ("iris/bad", token, SourceError, "URI is not usable"),
    ]
    for path, creds, error, message in cases:
        with pytest.raises(error, match=message):
            await source.resolve(parse(f"model-registry://{host}/{path}"), creds)

    no_host = await p.pull("model-registry://iris/v1", ok=False)
    assert no_host.state == FAILED and "MODEL_REGISTRY_ADDRESS" in str(no_host.error)
    assert "mr-secret" not in str(no_host.error)
