"""Each annotation's rules, the host policy, and planner details the goldens do not spell
out (size headroom, affinity merging corner cases, which annotation a denial names)."""

from __future__ import annotations

from typing import Any

import pytest

from common.reference import parse
from webhook.annotations import (
    AnnotationError,
    parse_quantity,
    read,
)
from webhook.hosts import refused_host
from webhook.plan import Denial, Plan, plan
from webhook.settings import PlanSettings

HF = "hf://org/name"


def ask(**annotations: str) -> dict[str, str]:
    return {"modelcache.io/" + k.replace("_", "-"): v for k, v in annotations.items()}


@pytest.mark.parametrize(("text", "expected"), [
    ("1", 1), ("15Gi", 15 * 2**30), ("500M", 500_000_000), ("1.5e9", 1_500_000_000),
    ("0.5Ki", 512), ("1.1", 2), ("2T", 2 * 10**12), ("1E", 10**18), ("3e2", 300),
])
def test_quantities(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1m", "15 Gi", "Gi", "1.2.3", "1e99", "8Ei", "0x10"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize("path", ["/mnt/models", "/models", "/srv/a.b/c-d_e@1", "/opt/m"])
def test_good_mount_paths(path: str) -> None:
    assert read(ask(model=HF, mount_path=path)).mount_path == path


@pytest.mark.parametrize(("path", "why"), [
    ("models", "not an absolute path"), ("/", "root"), ("/a//b", "not a clean"),
    ("/a/./b", "not a clean"), ("/a/../b", "not a clean"), ("/a/", "not a clean"),
    ("/proc/x", "under /proc"), ("/sys", "under /sys"), ("/dev/shm/m", "under /dev"),
    ("/etc", "under /etc"), ("/var/run/secrets/kubernetes.io", "under /var/run/secrets"),
    ("/var/run/modelcache/model", "under /var/run/modelcache"), ("/usr", "system directory"),
    ("/tmp", "system directory"), ("/var", "system directory"),
    ("/var/run", "system directory"), ("/a b", "characters"), ("/a:b", "characters"),
    ("/" + "a" * 600, "longer than"),
])
def test_bad_mount_paths(path: str, why: str) -> None:
    with pytest.raises(AnnotationError) as e:
        read(ask(model=HF, mount_path=path))
    assert e.value.annotation == "modelcache.io/mount-path"
    assert why in str(e.value)


def test_a_denial_names_the_annotation_at_fault() -> None:
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "model"), (ask(model="ftp://x/y"), "model"),
        (ask(model=HF, include="/abs"), "include"), (ask(model="hf://", include="*"), "model"),
        (ask(model=HF, credentials="A"), "credentials"), (ask(model=HF, fallback="x"), "fallback"),
        (ask(model=HF, mode="x"), "mode"), (ask(model=HF, containers="A"), "containers"),
        (ask(model=HF, containers="a,,b"), "containers"),
        (ask(model=HF, placement="x"), "placement"), (ask(model=HF, size="0"), "size"),
        (ask(model=HF, size="x" * 5000), "size"), (ask(model=HF, warm_memory="no"), "warm-memory"),
    ]
    for given, key in cases:
        with pytest.raises(AnnotationError) as e:
            read(given)
        assert e.value.annotation == f"modelcache.io/{key}", given
        assert str(e.value).startswith(f"annotation modelcache.io/{key}: ")


def test_values_are_trimmed_and_globs_canonical() -> None:
    request = read(ask(model=f"  {HF} ", include=" *.json , a/*.bin,*.json", containers="a, b,a"))
    assert request.uri == HF
    assert request.reference.include == ("*.json", "a/*.bin")
    assert request.containers == ("a", "b")
    assert request.reference.key == parse(HF, ["a/*.bin", "*.json"]).key


def test_warm_memory_opts_out_of_page_cache_warming() -> None:
    """The agent reads it from the pod (its pod watch); the webhook checks it and passes it
    through unchanged, without calling it unknown."""
    assert read(ask(model=HF)).warm_memory
    assert read(ask(model=HF, warm_memory="true")).warm_memory
    request = read(ask(model=HF, warm_memory=" false "))
    assert not request.warm_memory and request.unknown == ()


def test_unknown_annotation_keys_are_reported() -> None:
    request = read({**ask(model=HF), "modelcache.io/mount_path": "/x"})
    assert request.unknown == ("modelcache.io/mount_path",)
    assert request.mount_path == "/mnt/models"


@pytest.mark.parametrize(("uri", "allow", "refused"), [
    ("https://example.com/m.bin", [], False),
    ("https://8.8.8.8/m.bin", [], False),
    ("http://localhost/m", [], True),
    ("http://app.localhost/m", [], True),
    ("http://127.0.0.1:8080/m", [], True),
    ("http://[::1]/m", [], True),
    ("http://[::ffff:10.1.2.3]/m", [], True),
    ("http://0.0.0.0/m", [], True),
    ("http://100.64.1.1/m", [], True),
    ("https://169.254.169.254/m", [], True),
    ("oci://10.0.0.5:5000/m:1", [], True),
    ("oci://10.0.0.5:5000/m:1", ["10.0.0.5"], False),
    ("oci://10.0.0.5:5000/m:1", ["10.0.0.5:5000"], False),
    ("oci://10.0.0.5:5000/m:1", ["10.0.0.5:5001"], True),
    ("oci://10.0.0.5:5000/m:1", ["10.0.0.0/8"], False),
    ("http://localhost:9000/m", ["localhost"], False),
    ("http://[::1]:9000/m", ["::1"], False),
    ("http://[::1]:9000/m", ["[::1]:9000"], False),
    ("model-registry://192.168.1.2:8080/iris/v1", ["*.internal"], True),
    ("model-registry://iris/v1", [], False),
    ("s3://models/x/", [], False),
    ("pvc://claim", [], False),
])
def test_host_policy(uri: str, allow: list[str], refused: bool) -> None:
    assert (refused_host(parse(uri), allow) is not None) is refused


def pod_with(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "x"}], **spec}}


def planned(annotations: dict[str, str], labels: dict[str, str] | None = None,
            **spec: Any) -> Plan:
    result = plan(pod_with(annotations, **spec), labels or {}, PlanSettings())
    assert isinstance(result, Plan), result
    return result


def test_size_limit_has_headroom_in_whole_mebibytes() -> None:
    volumes = planned(ask(model=HF, size="100Mi")).pod["spec"]["volumes"]
    model = next(v for v in volumes if v["name"] == "modelcache-model")
    assert model["emptyDir"] == {"sizeLimit": "105Mi"}
    volumes = planned(ask(model=HF, size="1")).pod["spec"]["volumes"]
    model = next(v for v in volumes if v["name"] == "modelcache-model")
    assert model["emptyDir"] == {"sizeLimit": "1Mi"}


def test_require_warm_keeps_empty_terms_and_extends_live_ones() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{}, {"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["n"]}]}]}}}
    result = planned(ask(model=HF, placement="require-warm"), affinity=affinity)
    terms = result.pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0] == {}
    assert terms[1]["matchExpressions"][0]["key"].startswith("modelcache.io/m-")


def test_null_fields_are_treated_as_absent() -> None:
    result = planned(ask(model=HF), affinity=None, volumes=None, initContainers=None)
    spec = result.pod["spec"]
    assert spec["initContainers"][0]["name"] == "modelcache-init"
    assert "preferredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["nodeAffinity"]


def test_the_planner_does_not_change_its_input() -> None:
    pod = pod_with(ask(model=HF))
    snapshot = repr(pod)
    result = plan(pod, None, PlanSettings())
    assert isinstance(result, Plan)
    assert repr(pod) == snapshot
    assert result.pod != pod


def test_settings_reach_the_pod() -> None:
    settings = PlanSettings(store_path="/data/mc", agent_url="http://agent.x.svc:1",
                            image="registry.local/mc@sha256:" + "b" * 64)
    result = plan(pod_with(ask(model=HF)), {}, settings)
    assert isinstance(result, Plan)
    spec = result.pod["spec"]
    init = spec["initContainers"][0]
    assert init["image"] == settings.image
    assert init["command"][init["command"].index("--agent-url") + 1] == settings.agent_url
    store = next(v for v in spec["volumes"] if v["name"] == "modelcache-store")
    assert store["hostPath"]["path"].startswith("/data/mc/models/")


def test_file_models_cannot_be_downloaded() -> None:
    result = plan(pod_with(ask(model="file:///mnt/seed/m", mode="download")), {}, PlanSettings())
    assert isinstance(result, Denial) and result.annotation == "modelcache.io/mode"
    warned = planned(ask(model="file:///mnt/seed/m", size="1Gi")).warnings
    assert any("file://" in w for w in warned)
