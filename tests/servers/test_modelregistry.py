"""The local Model Registry is faithful: the real PyPI ``model-registry`` client registers
models in it and reads them back (in a subprocess: the client patches asyncio globally)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.servers.modelregistry import ModelRegistryServer
from tests.servers.net import fetch

CLIENT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from model_registry import ModelRegistry

host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = ModelRegistry(host, port, author="tester", is_secure=False, user_token=token)
r.register_model(
    "iris", "s3://models/iris/v1/", version="v1", model_format_name="onnx",
    model_format_version="1", storage_key="aws-conn", version_description="first",
    metadata={"accuracy": 0.97, "framework": "sklearn"},
)
r.register_model(
    "iris", "oci://127.0.0.1:5000/models/iris:v2", version="v2",
    model_format_name="onnx", model_format_version="1",
)
r.register_model(
    "granite", "http://127.0.0.1:8080/granite.tar.gz", version="1.0",
    model_format_name="safetensors", model_format_version="1",
)
rm = r.get_registered_model("iris")
mv = r.get_model_version("iris", "v1")
ma = r.get_model_artifact("iris", "v1")
ma2 = r.get_model_artifact("iris", "v2")
versions = [v.name for v in r.get_model_versions("iris").page_size(1)]
models = [m.name for m in r.get_registered_models().page_size(1)]
ma.description = "updated"
r.update(ma)
again = r.get_model_artifact("iris", "v1")
print(json.dumps({
    "rm": [rm.id, rm.name, rm.owner, rm.state.value],
    "mv": [mv.id, mv.name, mv.author, mv.registered_model_id, mv.description,
           sorted(mv.custom_properties)],
    "ma": [ma.id, ma.uri, ma.model_format_name, ma.storage_key],
    "ma2": ma2.uri, "versions": versions, "models": models, "desc": again.description,
    "missing": r.get_registered_model("nope"),
}))
"""


@pytest.mark.slow
def test_real_client_registers_and_reads_back(model_registry: ModelRegistryServer) -> None:
    host, port = model_registry.host_port.split(":")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, f"http://{host}", port, "mr-token"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rm"][1:] == ["iris", "tester", "LIVE"]
    assert got["mv"][1:] == ["v1", "tester", got["rm"][0], "first", ["accuracy", "framework"]]
    assert got["ma"][1:] == ["s3://models/iris/v1/", "onnx", "aws-conn"]
    assert got["ma2"] == "oci://127.0.0.1:5000/models/iris:v2"
    assert got["versions"] == ["v1", "v2"]
    assert got["models"] == ["iris", "granite"]
    assert got["desc"] == "updated"
    assert got["missing"] is None
    assert {e.authorization for e in model_registry.log()} == {"Bearer mr-token"}
    assert any(e.path.startswith("/api/model_registry/v1/") for e in model_registry.log())


def test_lookup_by_rest_as_a_source_would(model_registry: ModelRegistryServer) -> None:
    model_registry.register("llama", "v3", "hf://meta/llama@main", modelFormatName="pt")
    base = model_registry.base_url + "/api/model_registry/v1alpha3"
    rm = fetch(base + "/registered_model?name=llama").json()
    mv = fetch(f"{base}/model_version?name=v3&parentResourceId={rm['id']}").json()
    arts = fetch(f"{base}/model_versions/{mv['id']}/artifacts").json()
    assert arts["size"] == 1 and arts["nextPageToken"] == ""
    assert arts["items"][0]["uri"] == "hf://meta/llama@main"
    assert arts["items"][0]["artifactType"] == "model-artifact"

    missing = fetch(base + "/registered_model?name=absent")
    assert missing.status == 404 and set(missing.json()) == {"code", "message"}
    assert fetch(base + "/registered_models/abc").status == 400
    dup = fetch(
        base + "/registered_models",
        method="POST",
        data=json.dumps({"name": "llama"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert dup.status == 409


def test_bearer_token_required_when_set(
    model_registry_factory: Callable[..., ModelRegistryServer],
) -> None:
    srv = model_registry_factory(token="t0k")
    base = srv.base_url + "/api/model_registry/v1alpha3/registered_models"
    assert fetch(base).status == 401
    assert fetch(base, headers={"Authorization": "Bearer t0k"}).status == 200
