"""The CachedModel and NodeCache CRDs and the agent's RBAC: valid Kubernetes objects,
structural schemas that accept what the agent, the counts controller and users write and
refuse what they must not."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.kube.client import COUNTED_STATES, MODEL_ENTRY_FIELDS
from common.reference import CACHED_SCHEMES, SCHEMES
from tests.kubeapi.crd import to_json_schema
from tests.kubeapi.server import REPO

CRD = REPO / "deploy" / "base" / "crd-cachedmodel.yaml"
NODE_CRD = REPO / "deploy" / "base" / "crd-nodecache.yaml"
RBAC = REPO / "deploy" / "base" / "rbac-agent.yaml"
#: short names of built-in resources (kubectl api-resources on 1.3x)
BUILTIN_SHORT_NAMES = {
    "cm", "cs", "ds", "deploy", "ep", "ev", "hpa", "ing", "limits", "netpol", "no", "ns", "pc",
    "pdb", "po", "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc", "crd", "crds",
    "csr", "ingclass", "vac", "ipa", "csinode", "scc",
}


def load(path: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd(path: Any = CRD) -> dict[str, Any]:
    [doc] = load(path)
    return doc


def schema(path: Any = CRD) -> dict[str, Any]:
    [version] = crd(path)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def validator(path: Any = CRD) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        to_json_schema(schema(path)), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def example(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel",
            "metadata": {"name": "llama", "namespace": "ml"},
            "spec": {"uri": "hf://meta-llama/Llama-3.1-8B@main", **spec}}


@pytest.mark.parametrize("path", [CRD, NODE_CRD, RBAC], ids=lambda p: p.name)
def test_manifests_validate_strictly(path: Any):
    for doc in load(path):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_crd_names():
    doc = crd()
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{names['plural']}.{doc['spec']['group']}"
    assert (doc["spec"]["group"], names["kind"], doc["spec"]["scope"]) == (
        "modelcache.io", "CachedModel", "Namespaced")
    assert not set(names.get("shortNames", [])) & BUILTIN_SHORT_NAMES
    [version] = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


VALID = [
    example(),
    example(include=["*.safetensors", "config.json"], nodeSelector={"gpu": "a100"},
            credentialsSecret="hf-token", pin=True),
    example(uri="oci://registry:5000/models/granite:1.0"),
    example(verify="release-key"),
    {**example(), "status": {"ready": 1, "pulling": 2, "failed": 1}},
]


def node_cache(**status: Any) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "NodeCache",
            "metadata": {"name": "node-1"}, "status": status}


NODE_VALID = [
    node_cache(),
    node_cache(models=[
        {"namespace": "ml", "name": "llama", "uid": "0f3c", "key": "a" * 24, "state": "ready",
         "revision": "a" * 40, "bytes": 16 * 2**30, "lastTransitionTime": "2025-05-01T12:00:00Z",
         "verified": {"policy": "ml/release-key", "signer": "key sha256:00",
                      "time": "2025-05-01T12:00:00Z"}},
        {"namespace": "ml", "name": "granite", "state": "failed", "message": "401 from the hub",
         "lastTransitionTime": "2025-05-01T12:00:00Z"},
        {"namespace": "team-b", "name": "llama", "state": "pulling", "bytes": 0},
        {"namespace": "ml", "name": "old", "state": "evicted"},
    ], ready=1, pulling=1, failed=1, bytes=16 * 2**30),
]


@pytest.mark.parametrize("obj", VALID)
def test_examples_validate_against_the_crd_schema(obj: dict[str, Any]):
    assert list(validator().iter_errors(obj)) == []


@pytest.mark.parametrize("obj", NODE_VALID)
def test_node_caches_validate_against_their_schema(obj: dict[str, Any]):
    assert list(validator(NODE_CRD).iter_errors(obj)) == []


def _broken(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = copy.deepcopy(base or VALID[4])
    *parents, last = path.split(".")
    cur = obj
    for p in parents:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    if value is _DELETE:
        del cur[last]
    else:
        cur[last] = value
    return obj


_DELETE = object()
INVALID = {
    "no spec": _broken("spec", _DELETE),
    "no uri": _broken("spec.uri", _DELETE),
    "empty uri": _broken("spec.uri", ""),
    "uri too long": _broken("spec.uri", "hf://org/" + "x" * 2048),
    "pvc is not cached": _broken("spec.uri", "pvc://claim/model"),
    "no scheme": _broken("spec.uri", "meta-llama/Llama"),
    "include not a list": _broken("spec.include", "*.json"),
    "nodeSelector values are strings": _broken("spec.nodeSelector", {"gpu": True}),
    "pin is a boolean": _broken("spec.pin", "yes"),
    "secret name": _broken("spec.credentialsSecret", "Not_A_Name"),
    "negative count": _broken("status.ready", -1),
    "verify policy name": _broken("spec.verify", "Release_Key"),
}
NODE_INVALID = {
    "unknown state": _broken("status.models.0.state", "warm", NODE_VALID[1]),
    "entry without state": _broken("status.models.2.state", _DELETE, NODE_VALID[1]),
    "entry without its CachedModel": _broken("status.models.2.name", _DELETE, NODE_VALID[1]),
    "negative bytes": _broken("status.models.2.bytes", -1, NODE_VALID[1]),
    "bad time": _broken("status.models.0.lastTransitionTime", "yesterday", NODE_VALID[1]),
    "verified without signer": _broken("status.models.0.verified",
                                       {"policy": "p", "time": "2025-05-01T12:00:00Z"},
                                       NODE_VALID[1]),
    "models not a list": _broken("status.models", {"ml/llama": {"state": "ready"}},
                                 NODE_VALID[1]),
    "negative count": _broken("status.failed", -1, NODE_VALID[1]),
}


@pytest.mark.parametrize("obj", INVALID.values(), ids=INVALID.keys())
def test_invalid_examples_are_refused(obj: dict[str, Any]):
    assert list(validator().iter_errors(obj)) != []


@pytest.mark.parametrize("obj", NODE_INVALID.values(), ids=NODE_INVALID.keys())
def test_invalid_node_caches_are_refused(obj: dict[str, Any]):
    assert list(validator(NODE_CRD).iter_errors(obj)) != []


def test_node_cache_is_cluster_scoped_and_named():
    doc = crd(NODE_CRD)
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{names['plural']}.{doc['spec']['group']}"
    assert (doc["spec"]["group"], names["kind"], doc["spec"]["scope"]) == (
        "modelcache.io", "NodeCache", "Cluster")
    assert not set(names.get("shortNames", [])) & BUILTIN_SHORT_NAMES
    models = schema(NODE_CRD)["properties"]["status"]["properties"]["models"]
    assert models["x-kubernetes-list-type"] == "map"
    assert set(models["x-kubernetes-list-map-keys"]) <= set(models["items"]["required"])


def test_uri_pattern_follows_the_reference_grammar():
    pattern = re.compile(schema()["properties"]["spec"]["properties"]["uri"]["pattern"])
    for scheme in SCHEMES:
        assert bool(pattern.match(f"{scheme}://x")) == (scheme in CACHED_SCHEMES), scheme


def test_status_matches_what_the_agent_and_the_counts_controller_write():
    status = schema()["properties"]["status"]["properties"]
    assert set(status) == set(COUNTED_STATES)
    node_status = schema(NODE_CRD)["properties"]["status"]["properties"]
    entry = node_status["models"]["items"]
    assert tuple(entry["properties"]) == MODEL_ENTRY_FIELDS
    assert set(entry["properties"]["state"]["enum"]) >= set(COUNTED_STATES)
    assert set(COUNTED_STATES) <= set(node_status)


@pytest.mark.parametrize("path", [CRD, NODE_CRD], ids=lambda p: p.name)
def test_schema_is_structural(path: Any):
    """Every node has a type, metadata is left to the server, defaults are valid."""

    def walk(node: dict[str, Any], path: str) -> None:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if "default" in node:
            jsonschema.validate(node["default"], to_json_schema(node))
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    root = schema(path)
    walk(root, "")
    assert root["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize(("path", "shown"), [
    (CRD, {"URI", "Ready", "Pulling", "Failed", "Pinned", "Age"}),
    (NODE_CRD, {"Ready", "Pulling", "Failed", "Bytes", "Age"})], ids=["cachedmodel", "nodecache"])
def test_printer_columns_point_at_schema_fields(path: Any, shown: set[str]):
    [version] = crd(path)["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert shown <= set(columns)
    for column in columns.values():
        fields = column["jsonPath"].lstrip(".").split(".")
        if fields[0] == "metadata":
            continue
        node = schema(path)
        for part in fields:
            node = node["properties"][part]
        expected = {"integer": "integer", "boolean": "boolean", "string": "string"}
        assert expected[node["type"]] == column["type"], column["name"]
