"""Property tests: any pod plus any annotations (garbage included) gets a schema-valid patch
or a clear denial, never a crash; and mutating twice equals mutating once."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from webhook_testkit import (
    admission_review,
    apply,
    decoded_patch,
    validate_pod,
    validate_pod_fast,
)

from webhook import patch
from webhook.admission import Context, review
from webhook.annotations import INJECT_LABEL, KNOWN
from webhook.settings import PlanSettings

NAMES = st.sampled_from(["server", "app", "sidecar", "metrics", "warmup", "init-db"])
PATHS = st.sampled_from(["/data", "/models", "/cache", "/tmp", "/data/"])
CONFLICTING_PATHS = st.sampled_from(["/mnt/models", "/mnt/models/", "/var/run/modelcache/model"])
VOLUME_NAMES = st.sampled_from(["data", "cache", "cfg"])
CONFLICTING_VOLUMES = st.sampled_from(["modelcache-model", "modelcache-x"])

#: per annotation: values that are fine, and values that are not (garbage text is added)
GOOD = {
    "modelcache.io/model": st.sampled_from([
        "hf://Qwen/Qwen2.5-0.5B@main", "hf://org/name", "s3://models/llama/",
        "oci://ghcr.io/m/g:1", "oci://registry.example.com:5000/models/granite@sha256:"
        + "a" * 64, "https://example.com/m.bin", "pvc://claim/sub", "pvc://claim",
        "file:///mnt/seed/m", "model-registry://iris/v1", " hf://org/padded ",
    ]),
    "modelcache.io/mount-path": st.sampled_from(["/mnt/models", "/models", "/data/m", "/srv/m"]),
    "modelcache.io/include": st.sampled_from(["*.json", "*.json, *.bin", "config.json", ""]),
    "modelcache.io/credentials": st.sampled_from(["hf-token", "s3.creds"]),
    "modelcache.io/fallback": st.sampled_from(["source", "none"]),
    "modelcache.io/mode": st.sampled_from(["csi", "cache", "download"]),
    "modelcache.io/placement": st.sampled_from(["prefer-warm", "require-warm"]),
    "modelcache.io/size": st.sampled_from(["15Gi", "1", "1.5e9", "500M", "0.5Ki", "2T"]),
    "modelcache.io/warm-memory": st.sampled_from(["true", "false", " false "]),
    "modelcache.io/verify": st.sampled_from(["release-key", "corp.ca"]),
}
BAD = {
    "modelcache.io/model": st.sampled_from([
        "http://10.0.0.1/m.bin", "https://[::1]/m", "http://localhost/x", "ftp://x/y", "hf://",
        "hf://a/../b", "s3://", "pvc://Bad_Claim", "", " ", "https://user:pw@host/x",
        "https://169.254.169.254/x", "oci://0.0.0.0/x:1"]),
    "modelcache.io/mount-path": st.sampled_from(["/", "/etc/x", "rel", "/a//b", "/tmp",
                                                 "/a/../b", "/var/run/modelcache/model",
                                                 "/proc", "/var", "/a b"]),
    "modelcache.io/include": st.sampled_from([",", "/abs", "../x", "[a", "a" * 300]),
    "modelcache.io/credentials": st.sampled_from(["Bad_Name", "", "a" * 300]),
    "modelcache.io/fallback": st.sampled_from(["maybe", ""]),
    "modelcache.io/mode": st.sampled_from(["copy", "Cache"]),
    "modelcache.io/containers": st.sampled_from(["nope", "", "Server", "a,,b"]),
    "modelcache.io/placement": st.sampled_from(["always", ""]),
    "modelcache.io/size": st.sampled_from(["0", "-1", "lots", "1e99", "15 Gi", "1m"]),
    "modelcache.io/warm-memory": st.sampled_from(["no", "False", "0", ""]),
    "modelcache.io/verify": st.sampled_from(["Release_Key", "", "a/b", "a" * 300, "-x"]),
    "modelcache.io/injected": st.sampled_from(["{}", "x", '{"key":"0","mode":"cache"}', "[]"]),
}


@st.composite
def annotation_sets(draw: st.DrawFn, names: list[str]) -> dict[str, str]:
    """Mostly well-formed sets (so mutation is exercised), often with garbage mixed in."""
    garbage = draw(st.integers(0, 2)) == 0
    good = {**GOOD, "modelcache.io/containers": st.lists(
        st.sampled_from(names), min_size=1, max_size=2).map(",".join)}
    annotations: dict[str, str] = {}
    for key in sorted(KNOWN):
        wanted = key == "modelcache.io/model" and draw(st.integers(0, 9)) > 0
        if not wanted and draw(st.integers(0, 3)) != 0:
            continue
        if garbage and draw(st.integers(0, 2)) == 0:
            annotations[key] = draw(BAD[key] if draw(st.booleans()) else st.text(max_size=40))
        elif key in good:
            annotations[key] = draw(good[key])
    if garbage and draw(st.integers(0, 3)) == 0:
        annotations["modelcache.io/" + draw(st.text(min_size=1, max_size=20))] = draw(
            st.text(max_size=20))
    if garbage and draw(st.integers(0, 5)) == 0:
        annotations[draw(st.sampled_from(sorted(KNOWN)))] = "x" * draw(st.sampled_from(
            [4096, 4097, 6000]))
    if draw(st.integers(0, 15)) == 0:
        annotations["kubernetes.io/config.mirror"] = "abc"
    return annotations


def container(name: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": "busybox:1.36"}
    if mounts:
        c["volumeMounts"] = mounts
    return c


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    split = draw(st.integers(0, len(names) - 1))
    conflicts = draw(st.integers(0, 5)) == 0
    volume_names = st.one_of(VOLUME_NAMES, CONFLICTING_VOLUMES) if conflicts else VOLUME_NAMES
    paths = st.one_of(PATHS, CONFLICTING_PATHS) if conflicts else PATHS
    volumes = draw(st.lists(volume_names, max_size=3, unique=True))

    def mounts() -> list[dict[str, Any]]:
        if not volumes:
            return []
        chosen = draw(st.lists(st.tuples(st.sampled_from(volumes), paths), max_size=2,
                               unique_by=lambda t: t[1].rstrip("/")))
        return [{"name": v, "mountPath": p} for v, p in chosen]

    spec: dict[str, Any] = {"containers": [container(n, mounts()) for n in names[split:]]}
    if split:
        spec["initContainers"] = [container(n, mounts()) for n in names[:split]]
    if volumes:
        spec["volumes"] = [{"name": v, "emptyDir": {}} for v in volumes]
    if draw(st.booleans()):
        spec["affinity"] = draw(affinities())
    if draw(st.integers(0, 8)) == 0:
        spec["nodeName"] = "node-1"
    labels = {"app": "x"}
    if draw(st.integers(0, 3)) > 0:
        labels[INJECT_LABEL] = draw(st.sampled_from(["true", "true", "false"]))
    metadata: dict[str, Any] = {"name": "p", "namespace": "ml", "labels": labels}
    annotations = draw(annotation_sets(names))
    if annotations or draw(st.booleans()):
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


@st.composite
def affinities(draw: st.DrawFn) -> dict[str, Any]:
    expression = st.fixed_dictionaries({
        "key": st.sampled_from(["gpu", "zone"]), "operator": st.just("In"),
        "values": st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2)})
    term = st.fixed_dictionaries({}, optional={
        "matchExpressions": st.lists(expression, max_size=2),
        "matchFields": st.just([{"key": "metadata.name", "operator": "In",
                                 "values": ["node-1"]}])})
    node: dict[str, Any] = {}
    if draw(st.booleans()):
        node["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": draw(st.lists(term, min_size=1, max_size=3))}
    if draw(st.booleans()):
        node["preferredDuringSchedulingIgnoredDuringExecution"] = draw(st.lists(
            st.fixed_dictionaries({"weight": st.integers(1, 100),
                                   "preference": st.fixed_dictionaries(
                                       {"matchExpressions": st.lists(expression, max_size=2)})}),
            max_size=2))
    return {"nodeAffinity": node} if node or draw(st.booleans()) else {}


NAMESPACE_LABELS = st.one_of(
    st.none(),
    st.just({}),
    st.sampled_from(["privileged", "baseline", "restricted", "nonsense"]).map(
        lambda level: {"pod-security.kubernetes.io/enforce": level}),
)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), labels=NAMESPACE_LABELS, csi=st.booleans())
def test_any_pod_gets_a_valid_patch_or_a_clear_denial(
    pod: dict[str, Any], labels: dict[str, str] | None, csi: bool
) -> None:
    validate_pod_fast(pod)  # the generator makes pods the API server would accept
    ctx = Context(PlanSettings(csi=csi), "modelcache", lambda namespace: labels)
    outcome = review(json.dumps(admission_review(pod)).encode(), ctx)
    assert outcome.status == 200
    assert outcome.outcome in ("mutated", "skipped", "denied"), outcome.body
    event(outcome.outcome)
    response = outcome.body["response"]
    assert all(len(w) <= 120 for w in response.get("warnings", []))
    if outcome.outcome == "denied":
        message = response["status"]["message"]
        assert 0 < len(message) < 1000
        assert "modelcache" in message or "container" in message
        return
    ops = decoded_patch(response)
    if ops is None:
        return
    mutated = apply(pod, ops)
    validate_pod_fast(mutated)
    mode = json.loads(mutated["metadata"]["annotations"]["modelcache.io/injected"])["mode"]
    event(f"mode {mode}")
    if mode == "csi":  # the driver's volume, read-only, and nothing else of ours
        assert csi
        ours = [v for v in mutated["spec"]["volumes"] if v["name"].startswith("modelcache-")]
        assert [set(v) for v in ours] == [{"name", "csi"}]
        assert ours[0]["csi"]["driver"] == "csi.modelcache.io" and ours[0]["csi"]["readOnly"]
        inits = [c["name"] for c in mutated["spec"].get("initContainers") or []]
        assert "modelcache-init" not in inits
    again = review(json.dumps(admission_review(mutated)).encode(), ctx)
    assert again.outcome == "skipped" and "patch" not in again.body["response"], (
        "mutating twice differs from mutating once")
    assert apply(mutated, decoded_patch(again.body["response"])) == mutated


def test_fast_validation_agrees_with_kubernetes_validate() -> None:
    """The property test's cached validator is kubernetes-validate's, just loaded once."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "b"}]}}
    validate_pod(pod)
    validate_pod_fast(pod)
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": "/x",
                                                     "readonly": True}]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod(pod)
    with pytest.raises(jsonschema.ValidationError):
        validate_pod_fast(pod)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "c", "a/b", "~", "name"]), children,
                      max_size=4),
    max_leaves=20,
)


@st.composite
def document_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two documents, often close to each other (as a pod and its mutation are)."""
    before = draw(st.dictionaries(st.sampled_from(["metadata", "spec", "x"]), JSON_VALUES))
    if draw(st.booleans()):
        return before, draw(st.dictionaries(st.sampled_from(["metadata", "spec", "y"]),
                                            JSON_VALUES))
    after = json.loads(json.dumps(before))
    for _ in range(draw(st.integers(1, 4))):
        node: Any = after
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            node = node[draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                             else range(len(node))))]
        if isinstance(node, dict):
            node[draw(st.sampled_from(["a", "name", "new", "x/y"]))] = draw(JSON_VALUES)
        elif isinstance(node, list):
            where = draw(st.sampled_from(["front", "end", "pop"]))
            if where == "front":
                node.insert(0, draw(JSON_VALUES))
            elif where == "end":
                node.append(draw(JSON_VALUES))
            elif node:
                node.pop(draw(st.integers(0, len(node) - 1)))
    return before, after


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(pair=document_pairs())
def test_patch_turns_the_original_into_the_plan(
    pair: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    before, after = pair
    ops = patch.make(before, after)
    assert patch.apply(before, ops) == after
    assert (ops == []) == (before == after)
    json.dumps(ops)  # plain JSON, ready to encode


GARBAGE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["metadata", "spec", "annotations", "labels", "containers", "name",
                         "initContainers", "volumes", "affinity", "modelcache.io/model",
                         "modelcache.io/inject", "volumeMounts", "os", "nodeAffinity"]),
        children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(obj=GARBAGE, model=st.booleans())
def test_malformed_objects_are_answered_not_crashed_on(obj: Any, model: bool) -> None:
    """Whatever the object, the answer is a review with the UID, never a 500."""
    if model and isinstance(obj, dict):
        obj.setdefault("metadata", {})
        if isinstance(obj["metadata"], dict):
            obj["metadata"]["annotations"] = {"modelcache.io/model": "hf://org/name"}
    body = json.dumps(admission_review(obj)).encode()
    outcome = review(body, Context(PlanSettings(), "modelcache", lambda namespace: None))
    assert outcome.status == 200
    response = outcome.body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert outcome.crash is None, outcome.crash
    if not response["allowed"]:
        assert response["status"]["code"] in (400, 403)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200) | GARBAGE.map(lambda v: json.dumps(v).encode()))
def test_any_body_gets_an_answer(body: bytes) -> None:
    outcome = review(body, Context(PlanSettings(), "modelcache", lambda namespace: None))
    assert outcome.status in (200, 400)
    assert outcome.crash is None
