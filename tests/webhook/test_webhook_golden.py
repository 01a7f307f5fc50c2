"""Golden tests: for every case, the AdmissionReview in and the exact answer out.

Each ``golden/<case>.json`` holds the review kube-apiserver would send, the namespace's
labels as the webhook knows them (null: unknown), optional settings, and the expected
answer with its patch decoded. A mutated pod (the patch applied with ``jsonpatch``) must
pass ``kubernetes-validate --strict`` for the oldest and newest Kubernetes we claim, and
reviewing it again must give no patch. Regenerate the expected answers after a deliberate
change with ``MODELCACHE_UPDATE_GOLDEN=1 pytest tests/webhook/test_webhook_golden.py`` and
read the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from webhook_testkit import (
    admission_review,
    apply,
    decoded_patch,
    restricted_violations,
    validate_pod,
)

from webhook.admission import Context, review
from webhook.annotations import KNOWN
from webhook.plan import INIT_NAME
from webhook.settings import PlanSettings

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))
UPDATE = os.environ.get("MODELCACHE_UPDATE_GOLDEN") == "1"


def load(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())
    return case


def context(case: dict[str, Any]) -> Context:
    settings = case.get("settings") or {}
    plan_settings = PlanSettings(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in settings.items()})
    labels = case["namespaceLabels"]
    return Context(plan_settings, "modelcache", lambda namespace: labels)


def answer(case: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    outcome = review(json.dumps(case["review"]).encode(), context(case))
    body = json.loads(json.dumps(outcome.body))
    response = body["response"]
    if "patch" in response:
        response["patch"] = decoded_patch(response)
    return outcome.status, body


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    case = load(name)
    status, body = answer(case)
    if UPDATE:
        case["expected"] = body
        (GOLDEN / f"{name}.json").write_text(json.dumps(case, indent=2) + "\n")
    assert status == 200
    assert body == case["expected"]
    assert body["apiVersion"] == case["review"]["apiVersion"]
    assert body["response"]["uid"] == case["review"]["request"]["uid"]


@pytest.mark.parametrize("name", CASES)
def test_mutated_pod_is_valid_and_stable(name: str) -> None:
    case = load(name)
    _, body = answer(case)
    response = body["response"]
    for warning in response.get("warnings", []):
        assert len(warning) <= 120
    if not response["allowed"]:
        message = response["status"]["message"]
        assert response["status"]["code"] == 403
        named = [key for key in KNOWN if key in message]
        generic = ("volume named", "mounts something", "container named", "Linux pods")
        assert named or any(g in message for g in generic), message
        return
    if response.get("patch") is None:
        return
    request = case["review"]["request"]
    mutated = apply(request["object"], response["patch"])
    validate_pod(mutated)
    again = review(json.dumps(admission_review(mutated, namespace=request["namespace"])).encode(),
                   context(case))
    assert again.body["response"] == {"uid": request["uid"], "allowed": True}, "not idempotent"
    spec = mutated["spec"]
    ours = [v["name"] for v in spec["volumes"] if v["name"].startswith("modelcache-")]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    mode = json.loads(mutated["metadata"]["annotations"]["modelcache.io/injected"])["mode"]
    if mode in ("download", "pvc", "csi"):
        assert not any("hostPath" in v for v in spec["volumes"])
    if mode in ("cache", "download"):
        assert inits[0] == INIT_NAME
    else:
        assert INIT_NAME not in inits
    checks = case.get("checks", [])
    if "restricted-additions" in checks:
        assert restricted_violations(mutated, containers=[INIT_NAME], volumes=ours) == []
    if "restricted-pod" in checks:
        assert restricted_violations(request["object"]) == []
        assert restricted_violations(mutated) == []


def test_every_case_is_expected() -> None:
    """No golden file without an expected answer (a new case must be generated and read)."""
    missing = [name for name in CASES if "expected" not in load(name)]
    assert not missing


def test_download_mode_restricted_field_by_field() -> None:
    """The init container of download mode, checked against each `restricted` rule."""
    case = load("download-restricted-namespace")
    _, body = answer(case)
    mutated = apply(case["review"]["request"]["object"], body["response"]["patch"])
    spec = mutated["spec"]
    assert all("hostPath" not in v for v in spec["volumes"])
    init = spec["initContainers"][0]
    sc = init["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "ports" not in init
    assert init["resources"] == {
        # the 988M model's download with its headroom (990Mi), and 64Mi of its own
        "requests": {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": "1054Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"}}
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "projected", "secret", "configMap",
                                          "downwardAPI", "persistentVolumeClaim", "csi",
                                          "ephemeral"}
    for container in spec["containers"]:
        model = [m for m in container["volumeMounts"] if m["name"] == "modelcache-model"]
        assert model == [{"name": "modelcache-model", "mountPath": "/mnt/models",
                          "readOnly": True}]


def test_csi_mode_restricted_field_by_field() -> None:
    """With the driver installed, a restricted namespace gets mode csi: the pod stays
    restricted (and OpenShift restricted-v2 allows csi volumes), nothing privileged is
    added, and every target container sees the model read-only."""
    case = load("csi-restricted-namespace")
    _, body = answer(case)
    mutated = apply(case["review"]["request"]["object"], body["response"]["patch"])
    assert restricted_violations(mutated) == []
    spec = mutated["spec"]
    original = case["review"]["request"]["object"]["spec"]
    assert spec["containers"][0]["securityContext"] == \
        original["containers"][0]["securityContext"]
    assert "initContainers" not in spec
    (volume,) = [v for v in spec["volumes"] if v["name"] == "modelcache-model"]
    assert volume == {"name": "modelcache-model", "csi": {
        "driver": "csi.modelcache.io", "readOnly": True,
        "volumeAttributes": {"model": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"}}}
    for container in spec["containers"]:
        assert {"name": "modelcache-model", "mountPath": "/mnt/models",
                "readOnly": True} in container["volumeMounts"]
