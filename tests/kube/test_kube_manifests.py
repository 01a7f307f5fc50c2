"""The CachedModel CRD and the agent's RBAC: valid Kubernetes objects, a structural schema
that accepts what the agent and users write and refuses what they must not."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.kube.client import COUNTED_STATES, NODE_ENTRY_FIELDS
from common.reference import CACHED_SCHEMES, SCHEMES
from tests.kubeapi.crd import to_json_schema
from tests.kubeapi.server import REPO

CRD = REPO / "deploy" / "base" / "crd-cachedmodel.yaml"
RBAC = REPO / "deploy" / "base" / "rbac-agent.yaml"
#: short names of built-in resources (kubectl api-resources on 1.3x)
BUILTIN_SHORT_NAMES = {
    "cm", "cs", "ds", "deploy", "ep", "ev", "hpa", "ing", "limits", "netpol", "no", "ns", "pc",
    "pdb", "po", "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc", "crd", "crds",
    "csr", "ingclass", "vac", "ipa", "csinode", "scc",
}


def load(path: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd() -> dict[str, Any]:
    [doc] = load(CRD)
    return doc


def schema() -> dict[str, Any]:
    [version] = crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        to_json_schema(schema()), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def example(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel",
            "metadata": {"name": "llama", "namespace": "ml"},
            "spec": {"uri": "hf://meta-llama/Llama-3.1-8B@main", **spec}}


@pytest.mark.parametrize("path", [CRD, RBAC], ids=lambda p: p.name)
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
    {**example(), "status": {
        "nodes": {
            "node-1": {"state": "ready", "revision": "a" * 40, "bytes": 16 * 2**30,
                               "lastTransitionTime": "2025-05-01T12:00:00Z",
                       "verified": {"policy": "default/release-key", "signer": "key sha256:00",
                                    "time": "2025-05-01T12:00:00Z"}},
            "node-2": {"state": "failed", "message": "401 from the hub",
                       "lastTransitionTime": "2025-05-01T12:00:00Z"},
            "node-3": {"state": "pulling", "bytes": 0},
            "node-4": {"state": "evicted"},
            "node-5.zone-a.example.com": {"state": "pulling"},
        },
        "ready": 1, "pulling": 2, "failed": 1}},
]


@pytest.mark.parametrize("obj", VALID)
def test_examples_validate_against_the_crd_schema(obj: dict[str, Any]):
    assert list(validator().iter_errors(obj)) == []


def _broken(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(VALID[4])
    *parents, last = path.split(".")
    cur = obj
    for p in parents:
        cur = cur[p]
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
    "unknown state": _broken("status.nodes.node-1.state", "warm"),
    "entry without state": _broken("status.nodes.node-3", {"bytes": 1}),
    "negative bytes": _broken("status.nodes.node-3.bytes", -1),
    "bad time": _broken("status.nodes.node-1.lastTransitionTime", "yesterday"),
    "negative count": _broken("status.ready", -1),
    "verify policy name": _broken("spec.verify", "Release_Key"),
    "verified without signer": _broken("status.nodes.node-1.verified",
                                       {"policy": "p", "time": "2025-05-01T12:00:00Z"}),
}


@pytest.mark.parametrize("obj", INVALID.values(), ids=INVALID.keys())
def test_invalid_examples_are_refused(obj: dict[str, Any]):
    assert list(validator().iter_errors(obj)) != []


def test_uri_pattern_follows_the_reference_grammar():
    pattern = re.compile(schema()["properties"]["spec"]["properties"]["uri"]["pattern"])
    for scheme in SCHEMES:
        assert bool(pattern.match(f"{scheme}://x")) == (scheme in CACHED_SCHEMES), scheme


def test_status_entry_matches_what_the_agent_writes():
    status = schema()["properties"]["status"]["properties"]
    entry = status["nodes"]["additionalProperties"]
    assert tuple(entry["properties"]) == NODE_ENTRY_FIELDS
    assert set(entry["properties"]["state"]["enum"]) >= set(COUNTED_STATES)
    assert set(COUNTED_STATES) <= set(status)


def test_schema_is_structural():
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

    root = schema()
    walk(root, "")
    assert root["properties"]["metadata"] == {"type": "object"}


def test_printer_columns_point_at_schema_fields():
    [version] = crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"URI", "Ready", "Pinned", "Age"} <= set(columns)
    for column in columns.values():
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema()
        for part in path:
            node = node["properties"][part]
        expected = {"integer": "integer", "boolean": "boolean", "string": "string"}
        assert expected[node["type"]] == column["type"], column["name"]
