"""Every manifest of every render validates, and the objects fit together as DESIGN.md says.

Renders: the base, both overlays, both overlays with the monitoring component, and the kind
example (``render.RENDERS``). Schemas: ``schemas.py``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agent.cli.main import parser as cli_parser
from agent.config import load_config
from tests.deploy import render, schemas
from tests.deploy.render import (
    DEPLOY,
    INSTALLABLE,
    RENDERS,
    WITH_CSI,
    WITHOUT_CSI,
    expanded_args,
    find,
    pod_specs,
)
from webhook.main import certs_parser, serve_parser, settings_from

#: oldest and newest Kubernetes we support (internalTrafficPolicy, PDB
#: unhealthyPodEvictionPolicy, reinvocationPolicy are all there in 1.29)
K8S_VERSIONS = ("1.29", "1.37")
IMAGE = "ghcr.io/modelcache/modelcache:0.1.0"
#: the CSI sidecars kubernetes-csi publishes, pinned by version
SIDECARS = {"node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar",
            "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe"}
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))
TOOLS = sorted((DEPLOY / "tools").glob("*.yaml"))


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(RENDERS))
def test_every_object_validates(name: str, version: str) -> None:
    docs = render.render(name)
    custom = schemas.crd_schemas(docs)
    for doc in docs:
        try:
            schemas.validate(doc, version, custom)
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")


MISSPELLINGS = [
    ("DaemonSet", "modelcache-agent",
     lambda d: d["spec"]["template"]["spec"].update(hostNetwrk=False)),
    ("MutatingWebhookConfiguration", "modelcache",
     lambda d: d["webhooks"][0].update(sideEffect="None")),
    ("ServiceMonitor", "modelcache-agent",
     lambda d: d["spec"]["endpoints"][0].update(intervall="1m")),
    ("Certificate", "modelcache-webhook",
     lambda d: d["spec"].update(dnsName=["x"])),
    ("PrometheusRule", "modelcache",
     lambda d: d["spec"]["groups"][0]["rules"][0].update(fr="1m")),
]


@pytest.mark.parametrize(("kind", "name", "misspell"), MISSPELLINGS,
                         ids=[m[0] for m in MISSPELLINGS])
def test_validation_rejects_a_misspelt_field(kind: str, name: str, misspell: Any) -> None:
    """The schemas are strict: a field in the wrong place or misspelt is an error."""
    docs = render.render("cert-manager+monitoring")
    custom = schemas.crd_schemas(docs)
    doc = find(docs, kind, name)
    schemas.validate(doc, K8S_VERSIONS[-1], custom)
    misspell(doc)
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(doc, K8S_VERSIONS[-1], custom)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES + TOOLS, ids=lambda p: p.name)
def test_examples_and_tools_validate(path: Path, version: str) -> None:
    """Example CachedModels against the CRD's own schema; example workloads strictly."""
    custom = schemas.crd_schemas(render.render("base"))
    for doc in _load(path):
        schemas.validate(doc, version, custom)


def test_example_cachedmodels_break_on_a_bad_spec() -> None:
    custom = schemas.crd_schemas(render.render("base"))
    doc = _load(DEPLOY / "examples" / "cachedmodel.yaml")[0]
    doc["spec"]["pinned"] = True
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(doc, K8S_VERSIONS[-1], custom)
    del doc["spec"]["pinned"], doc["spec"]["uri"]
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(doc, K8S_VERSIONS[-1], custom)


def test_example_workloads_opt_in() -> None:
    for path in EXAMPLES:
        for name, _ in pod_specs(_load(path)):
            doc = next(d for d in _load(path) if d["metadata"]["name"] == name)
            meta = doc["metadata"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]
            assert meta["labels"]["modelcache.io/inject"] == "true", name
            assert re.match(r"^(hf|s3|oci|https?|model-registry|file|pvc)://",
                            meta["annotations"]["modelcache.io/model"]), name


def test_kind_config() -> None:
    (doc,) = _load(DEPLOY / "examples" / "kind" / "kind-config.yaml")
    jsonschema.Draft202012Validator(schemas.KIND_CLUSTER).validate(doc)
    for patch in (p for n in doc["nodes"] for p in n.get("kubeadmConfigPatches", [])):
        assert yaml.safe_load(patch)["kind"] in ("JoinConfiguration", "InitConfiguration",
                                                 "ClusterConfiguration")


@pytest.mark.parametrize("name", ["base", "cert-manager", "self-signed", "kind"])
def test_every_kubectl_at_hand_renders_the_same(name: str) -> None:
    """kustomize differs between kubectl releases; ours (PATH, the pinned wheel) must agree."""
    found = render.kubectls()
    if len(found) < 2:
        pytest.skip("only one kubectl here")
    first, *others = (render.kustomize(RENDERS[name][0], k) for k in found)
    for other in others:
        assert other == first


@pytest.mark.parametrize("name", list(RENDERS))
def test_images_pinned(name: str) -> None:
    docs = render.render(name)
    for obj, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["name"] in SIDECARS and name in WITH_CSI:
                repository, _, tag = c["image"].partition(":")
                assert repository == SIDECARS[c["name"]], (obj, c["image"])
                assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), (obj, c["image"])
                continue
            assert c["image"] == IMAGE, (obj, c["name"], c["image"])
    for path in TOOLS:
        for obj, spec in pod_specs(_load(path)):
            assert {c["image"] for c in spec["containers"]} == {IMAGE}, obj
    for path in EXAMPLES:
        for obj, spec in pod_specs(_load(path)):
            for c in spec["containers"]:
                tag = c["image"].rpartition(":")[2]
                assert ":" in c["image"] and tag != "latest" and "/" not in tag, (obj, c["image"])


@pytest.mark.parametrize("name", list(RENDERS))
def test_init_image_follows_the_webhook_image(name: str) -> None:
    webhook = find(render.render(name), "Deployment", "modelcache-webhook")
    (c,) = webhook["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "--image=$(MODELCACHE_INIT_IMAGE)" in c["args"]
    assert env["MODELCACHE_INIT_IMAGE"] == c["image"]


@pytest.mark.parametrize("overlay", ["cert-manager", "self-signed"])
def test_changing_an_overlays_image_changes_the_init_image(overlay: str, tmp_path: Path) -> None:
    copied = tmp_path / "overlays" / overlay
    shutil.copytree(DEPLOY / "overlays" / overlay, copied)
    os.symlink(DEPLOY / "base", tmp_path / "base")
    k = copied / "kustomization.yaml"
    k.write_text(k.read_text().replace('newTag: "0.1.0"', 'newTag: "0.2.0"'))
    webhook = find(render.kustomize(copied), "Deployment", "modelcache-webhook")
    (c,) = webhook["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/modelcache/modelcache:0.2.0"
    assert {e["name"]: e.get("value") for e in c["env"]}["MODELCACHE_INIT_IMAGE"] == c["image"]


@pytest.mark.parametrize("name", list(RENDERS))
def test_namespaced_objects_live_in_modelcache(name: str) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole",
                      "ClusterRoleBinding", "PriorityClass", "MutatingWebhookConfiguration",
                      "CSIDriver"}
    for d in render.render(name):
        if d["kind"] not in cluster_scoped:
            assert d["metadata"].get("namespace") == "modelcache", (d["kind"], d["metadata"])


@pytest.mark.parametrize("name", INSTALLABLE)
def test_webhook_configuration(name: str) -> None:
    docs = render.render(name)
    (hook,) = find(docs, "MutatingWebhookConfiguration", "modelcache")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] <= 5
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    # the registration docs/webhook.md suggests is the one the manifests make
    suggested = re.search(r"`admissionReviewVersions: \[([^\]]*)\]`",
                          (DEPLOY.parent / "docs" / "webhook.md").read_text())
    assert suggested is not None
    assert [v.strip() for v in suggested.group(1).split(",")] == hook["admissionReviewVersions"]
    assert hook["objectSelector"] == {"matchLabels": {"modelcache.io/inject": "true"}}
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
    assert set(expr["values"]) == {"kube-system", "modelcache"}
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    # the Service it calls exists, and leads to the webhook container's TLS port
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == "/mutate"
    svc = find(docs, "Service", ref["name"])
    assert svc["metadata"]["namespace"] == ref["namespace"]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
    deploy = find(docs, "Deployment", "modelcache-webhook")
    assert _selects(svc["spec"]["selector"], deploy)
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    (cport,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
    assert f"--listen=0.0.0.0:{cport['containerPort']}" in c["args"]


def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", WITHOUT_CSI)
def test_agent_daemonset(name: str, tmp_path: Path) -> None:
    docs = render.render(name)
    ds = find(docs, "DaemonSet", "modelcache-agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is False
    assert {"operator": "Exists"} in spec["tolerations"]
    find(docs, "PriorityClass", spec["priorityClassName"])
    find(docs, "ServiceAccount", spec["serviceAccountName"])
    (store,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert store["hostPath"] == {"path": "/var/lib/modelcache", "type": "DirectoryOrCreate"}
    (agent,) = spec["containers"]
    assert agent["args"][:3] == ["agent", "--store=/var/lib/modelcache", "--listen=0.0.0.0:9400"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert [p["containerPort"] for p in agent["ports"]] == [9400]
    assert agent["resources"]["requests"] and agent["resources"]["limits"]["memory"]
    # the agent itself: no root, no capability; only the one-shot chown step has CAP_CHOWN
    sc = {**spec["securityContext"], **agent["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged")
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # the one-shot step hands over the store, models/ and what kubelet made in it
    step = cli_parser().parse_args(init["args"])
    assert (step.func.__name__, step.store, step.owner) == (
        "cmd_prepare_store", "/var/lib/modelcache", f"{sc['runAsUser']}:{sc['runAsGroup']}")
    # a disk mounted at the store path after the agent started is the agent's store too
    for container in (agent, init):
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == store["name"]]
        assert mount["mountPropagation"] == "HostToContainer", container["name"]
    # its config file comes from the ConfigMap
    (cfg,) = [v for v in spec["volumes"] if "configMap" in v]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(find(docs, "ConfigMap", cfg["configMap"]["name"])["data"]["config.yaml"])
    config = load_config(config_file)  # the agent's own schema check
    assert config["store"]["highWatermark"] == 0.8 and config["store"]["lowWatermark"] == 0.7
    args = cli_parser().parse_args(agent["args"])  # the agent's own command line
    assert (args.store, args.listen, args.config) == (
        "/var/lib/modelcache", "0.0.0.0:9400", "/etc/modelcache/config.yaml")
    assert not args.standalone


@pytest.mark.parametrize("name", INSTALLABLE)
def test_agent_service_is_node_local(name: str) -> None:
    docs = render.render(name)
    svc = find(docs, "Service", "modelcache-agent")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert _selects(svc["spec"]["selector"], find(docs, "DaemonSet", "modelcache-agent"))
    assert [p["port"] for p in svc["spec"]["ports"]] == [9400]
    (c,) = find(docs, "Deployment", "modelcache-webhook")["spec"]["template"]["spec"]["containers"]
    assert "--agent-url=http://modelcache-agent.modelcache.svc:9400" in c["args"]


@pytest.mark.parametrize("name", INSTALLABLE)
def test_webhook_deployment(name: str) -> None:
    docs = render.render(name)
    deploy = find(docs, "Deployment", "modelcache-webhook")
    assert deploy["spec"]["replicas"] == 2
    spec = deploy["spec"]["template"]["spec"]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = find(docs, "PodDisruptionBudget", "modelcache-webhook")
    assert pdb["spec"]["minAvailable"] == 1
    assert _selects(pdb["spec"]["selector"]["matchLabels"], deploy)
    (c,) = spec["containers"]
    assert c["args"][0] == "webhook"
    for arg in ("--listen=0.0.0.0:8443", "--tls-cert=/etc/modelcache/tls/tls.crt",
                "--tls-key=/etc/modelcache/tls/tls.key", "--store-path=/var/lib/modelcache"):
        assert arg in c["args"]
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the webhook's own command line and settings checks, on the args the kubelet passes
    server, planning = settings_from(serve_parser({}).parse_args(expanded_args(c)[1:]))
    assert (server.host, server.port) == ("0.0.0.0", 8443)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    assert {server.tls_cert, server.tls_key} == {f"{mount['mountPath']}/tls.crt",
                                                 f"{mount['mountPath']}/tls.key"}
    assert planning.image == c["image"]  # the init container runs this very image
    (store,) = [v for v in find(docs, "DaemonSet", "modelcache-agent")["spec"]["template"]
                ["spec"]["volumes"] if v["name"] == "store"]
    assert planning.store_path == store["hostPath"]["path"]
    assert planning.csi == (name in WITH_CSI)  # --csi exactly where the driver is installed
    assert server.namespace == deploy["metadata"]["namespace"]


@pytest.mark.parametrize("name", INSTALLABLE)
def test_restricted_pod_security_except_the_agent(name: str) -> None:
    """Every pod but the agent's passes the `restricted` profile, field by field."""
    for obj, spec in pod_specs(render.render(name)):
        if obj == "modelcache-agent":
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, obj
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", obj
        assert not any(k in v for v in spec.get("volumes", [])
                       for k in ("hostPath",)), obj
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), obj
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (obj, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc.get("runAsUser", 1) != 0 and not sc.get("privileged")


def test_cert_manager_overlay() -> None:
    docs = render.render("cert-manager")
    hook = find(docs, "MutatingWebhookConfiguration", "modelcache")
    ns, cert_name = hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    cert = find(docs, "Certificate", cert_name)
    assert cert["metadata"]["namespace"] == ns
    assert "modelcache-webhook.modelcache.svc" in cert["spec"]["dnsNames"]
    assert "server auth" in cert["spec"]["usages"]
    assert _tls_secret(docs) == cert["spec"]["secretName"]
    # serving cert <- CA Issuer <- CA certificate <- self-signed Issuer
    issuer = find(docs, "Issuer", cert["spec"]["issuerRef"]["name"])
    (ca,) = [d for d in docs if d["kind"] == "Certificate"
             and d["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]]
    assert ca["spec"]["isCA"] is True
    assert find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}
    assert "caBundle" not in hook["webhooks"][0]["clientConfig"]


def _tls_secret(docs: list[dict[str, Any]]) -> str:
    spec = find(docs, "Deployment", "modelcache-webhook")["spec"]["template"]["spec"]
    (tls,) = [v for v in spec["volumes"] if "secret" in v]
    return str(tls["secret"]["secretName"])


def test_self_signed_overlay() -> None:
    docs = render.render("self-signed")
    job = find(docs, "Job", "modelcache-webhook-certs")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"][:2] == ["webhook", "certs"]
    args = certs_parser().parse_args(expanded_args(c)[2:])  # the command's own parser
    hook = find(docs, "MutatingWebhookConfiguration", "modelcache")
    service = hook["webhooks"][0]["clientConfig"]["service"]
    assert (args.service, args.namespace) == (service["name"], service["namespace"])
    assert args.secret == _tls_secret(docs)
    assert args.webhook_config == hook["metadata"]["name"]
    assert args.out_dir is None  # the Secret is the output; nothing is written in the pod
    assert args.renew_before_days < args.days
    assert "cert-manager.io/inject-ca-from" not in (hook["metadata"].get("annotations") or {})
    # its permissions are its own, and as narrow as the API allows
    binding = find(docs, "ClusterRoleBinding", "modelcache-webhook-certs")
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]
    (rule,) = find(docs, "ClusterRole", binding["roleRef"]["name"])["rules"]
    assert rule["resourceNames"] == ["modelcache"] and sorted(rule["verbs"]) == ["get", "patch"]
    role = find(docs, "Role", "modelcache-webhook-certs")
    for r in role["rules"]:
        assert r["resources"] == ["secrets"]
        assert r["verbs"] == ["create"] or r["resourceNames"] == [_tls_secret(docs)]


@pytest.mark.parametrize("name", list(RENDERS))
def test_bindings_and_service_accounts_resolve(name: str) -> None:
    docs = render.render(name)
    for d in docs:
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            find(docs, d["roleRef"]["kind"], d["roleRef"]["name"])
            for s in d["subjects"]:
                assert s["kind"] == "ServiceAccount"
                find(docs, "ServiceAccount", s["name"])
    for _, spec in pod_specs(docs):
        find(docs, "ServiceAccount", spec["serviceAccountName"])
    # every ServiceAccount that runs a pod has a binding (agent and webhook need API access)
    bound = {s["name"] for d in docs if d["kind"].endswith("RoleBinding") for s in d["subjects"]}
    assert {spec["serviceAccountName"] for _, spec in pod_specs(docs)} <= bound


@pytest.mark.parametrize("name", ["cert-manager+monitoring", "self-signed+monitoring"])
def test_service_monitors_scrape_named_ports(name: str) -> None:
    docs = render.render(name)
    for component, port_name in (("agent", "http"), ("webhook", "https")):
        sm = find(docs, "ServiceMonitor", f"modelcache-{component}")
        svc = find(docs, "Service", f"modelcache-{component}")
        labels = svc["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
        (ep,) = sm["spec"]["endpoints"]
        assert ep["port"] == port_name in [p["name"] for p in svc["spec"]["ports"]]
        assert {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                "targetLabel": "node"} in ep["relabelings"]
    tls = find(docs, "ServiceMonitor", "modelcache-webhook")["spec"]["endpoints"][0]["tlsConfig"]
    assert tls["ca"]["secret"]["name"] == _tls_secret(docs)


@pytest.mark.parametrize("name", WITH_CSI)
def test_csi_component(name: str) -> None:
    """The driver object is what DESIGN.md says, and the DaemonSet's parts meet: the socket
    the agent serves is the one both sidecars use and the one kubelet is told, the pods'
    directory is the host's, with Bidirectional propagation."""
    from agent.config import _csi
    from agent.settings import ClusterSettings

    docs = render.render(name)
    driver = find(docs, "CSIDriver", "csi.modelcache.io")
    assert driver["metadata"]["labels"][
        "security.openshift.io/csi-ephemeral-volume-profile"] == "restricted"
    spec = driver["spec"]
    assert (spec["attachRequired"], spec["podInfoOnMount"], spec["requiresRepublish"]) == (
        False, True, False)
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["fsGroupPolicy"] == "None"
    assert [t["audience"] for t in spec["tokenRequests"]] == list(ClusterSettings.audiences)

    pod = find(docs, "DaemonSet", "modelcache-agent")["spec"]["template"]["spec"]
    assert "initContainers" not in pod or pod["initContainers"] == []
    assert pod["securityContext"]["runAsUser"] == 0
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"agent", *SIDECARS}
    agent = containers["agent"]
    assert agent["securityContext"]["privileged"] is True
    settings = _csi(cli_parser().parse_args(agent["args"]))
    assert settings.socket is not None
    volumes = {v["name"]: v for v in pod["volumes"]}

    def host_path(container: dict[str, Any], path: Path) -> Path:
        """Where ``path`` inside the container is on the node."""
        for m in sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"])):
            if path.is_relative_to(m["mountPath"]):
                return Path(volumes[m["name"]]["hostPath"]["path"]) / path.relative_to(
                    m["mountPath"])
        raise AssertionError(f"{path} is on no volume of {container['name']}")

    node_socket = host_path(agent, settings.socket)
    registrar = containers["node-driver-registrar"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in registrar["args"])
    assert host_path(registrar, Path(flags["csi-address"])) == node_socket
    assert Path(flags["kubelet-registration-path"]) == node_socket
    assert node_socket.parent == Path("/var/lib/kubelet/plugins/csi.modelcache.io")
    assert host_path(registrar, Path("/registration")) == \
        Path("/var/lib/kubelet/plugins_registry")
    probe = containers["liveness-probe"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in probe["args"])
    assert host_path(probe, Path(flags["csi-address"])) == node_socket
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports[agent["livenessProbe"]["httpGet"]["port"]] == int(flags["health-port"])
    (pods,) = [m for m in agent["volumeMounts"] if m["name"] == "kubelet-pods"]
    assert pods["mountPropagation"] == "Bidirectional"
    assert Path(pods["mountPath"]) == settings.kubelet_dir / "pods" == \
        Path(volumes["kubelet-pods"]["hostPath"]["path"])
    for sidecar in SIDECARS:
        sc = containers[sidecar]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {
            "drop": ["ALL"]}
