"""Helpers shared by the webhook tests: reviews as kube-apiserver sends them, schema and Pod
Security checks of mutated pods, the real webhook app served in process over TLS, and the
shared fake kube-apiserver (``tests/kubeapi``) set up as the webhook's cluster: its
namespace, its service account and its RBAC from ``deploy/``.

(A module of its own name, not ``conftest``: test modules import it directly.)
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import trustme
import yaml
from aiohttp import web
from kubernetes_validate import utils
from referencing import Registry, Resource

from tests.kubeapi import FakeKubeApi
from tests.kubeapi.server import REPO
from webhook.admission import Context, Planner
from webhook.metrics import WebhookMetrics
from webhook.namespaces import NamespaceCache
from webhook.plan import plan
from webhook.server import Deps, make_runner
from webhook.settings import PlanSettings
from webhook.tls import CertReloader

#: the oldest and newest Kubernetes versions whose pod schema we claim to satisfy
KUBE_VERSIONS = ("1.29", "1.37")


# --- reviews -------------------------------------------------------------------------------


def admission_review(
    pod: Any,
    *,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    namespace: str = "ml",
    operation: str = "CREATE",
    api_version: str = "admission.k8s.io/v1",
    dry_run: bool = False,
    old: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An AdmissionReview for a pod, shaped like the ones kube-apiserver posts."""
    options_kind = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions",
                    "DELETE": "DeleteOptions"}.get(operation)
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": _name(pod if isinstance(pod, dict) else old),
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": "a1b2c3", "groups": ["system:serviceaccounts",
                                                 "system:serviceaccounts:kube-system",
                                                 "system:authenticated"]},
        "object": pod,
        "oldObject": old,
        "dryRun": dry_run,
        "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"} if options_kind
        else None,
    }
    return {"kind": "AdmissionReview", "apiVersion": api_version, "request": request}


def _name(pod: dict[str, Any] | None) -> str:
    metadata = (pod or {}).get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else ""


def decoded_patch(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The JSON patch of a response, decoded; None when it has none."""
    if "patch" not in response:
        return None
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def apply(pod: dict[str, Any], ops: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not ops:
        return copy.deepcopy(pod)
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, ops, in_place=False)
    return patched


def validate_pod(pod: dict[str, Any]) -> None:
    """kubernetes-validate --strict for every version we claim (raises on the first error)."""
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


@functools.cache
def _pod_validator(version: str) -> jsonschema.protocols.Validator:
    """The very schema files ``kubernetes_validate.validate`` reads, loaded once."""
    full = next(v for v in utils.all_versions() if utils.major_minor(v) == version)
    directory = f"kubernetes-json-schema/v{full}-local-strict"
    schema = utils.schema_contents(f"{directory}/pod-v1.json", version)
    definitions = utils.schema_contents(f"{directory}/_definitions.json", version)
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_pod_fast(pod: dict[str, Any]) -> None:
    """:func:`validate_pod` with the schemas parsed once (for hundreds of examples)."""
    for version in KUBE_VERSIONS:
        _pod_validator(version).validate(pod)


# --- Pod Security "restricted", field by field ---------------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline + restricted)

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(
    pod: dict[str, Any], containers: Iterable[str] | None = None,
    volumes: Iterable[str] | None = None,
) -> list[str]:
    """Pod Security ``restricted`` violations, for the named containers and volumes (all
    when None), taking pod-level securityContext defaults into account."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    problems: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"pod: {field}")
    wanted_volumes = set(volumes) if volumes is not None else None
    for volume in spec.get("volumes") or []:
        if wanted_volumes is not None and volume["name"] not in wanted_volumes:
            continue
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            problems.append(f"volume {volume['name']}: hostPath")
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: type {sorted(kinds)} not allowed")
    wanted = set(containers) if containers is not None else None
    every = [*(spec.get("initContainers") or []), *spec["containers"]]
    for c in every:
        if wanted is not None and c["name"] not in wanted:
            continue
        sc = c.get("securityContext") or {}
        name = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities add {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{name}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{name}: hostPort")
    return problems


# --- the real webhook server, in process --------------------------------------------------


@dataclass
class CertFiles:
    cert: Path
    key: Path

    def write(self, issued: trustme.LeafCert) -> None:
        """Replace both files the way a Secret volume does: new inodes, renamed in."""
        pairs = ((self.cert, issued.cert_chain_pems), (self.key, [issued.private_key_pem]))
        for path, blob in pairs:
            tmp = path.with_suffix(".new")
            tmp.write_bytes(b"".join(b.bytes() for b in blob))
            tmp.replace(path)


@dataclass
class RunningWebhook:
    url: str
    deps: Deps
    reloader: CertReloader
    namespaces: NamespaceCache


def make_deps(
    reloader: CertReloader, plan_settings: PlanSettings, cache: NamespaceCache,
    planner: Planner = plan,
) -> Deps:
    metrics = WebhookMetrics()
    reloader.on_reload = metrics.cert_reloaded
    return Deps(
        admission=Context(plan_settings, "modelcache", cache.labels, planner),
        metrics=metrics, log=logging.getLogger("modelcache.webhook.test"),
        max_body_bytes=3 * 1024 * 1024, background=(lambda: reloader.run(0.02),),
    )


@contextlib.asynccontextmanager
async def serve(deps: Deps, reloader: CertReloader) -> AsyncIterator[str]:
    """The real webhook app over TLS on 127.0.0.1 (a free port); yields its base URL."""
    runner = make_runner(deps, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloader.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- the webhook's cluster (the shared fake apiserver) ----------------------------------------

WEBHOOK_NAMESPACE, WEBHOOK_SA = "modelcache", "modelcache-webhook"
WEBHOOK_TOKEN = "webhook-sa-token"
WEBHOOK_USER = f"system:serviceaccount:{WEBHOOK_NAMESPACE}:{WEBHOOK_SA}"
WEBHOOK_RBAC = REPO / "deploy" / "base" / "rbac-webhook.yaml"


@contextlib.asynccontextmanager
async def webhook_cluster() -> AsyncIterator[FakeKubeApi]:
    """The shared fake apiserver on 127.0.0.1, enforcing RBAC: the webhook's service account
    (token :data:`WEBHOOK_TOKEN`) has exactly what deploy/base/rbac-webhook.yaml grants."""
    async with FakeKubeApi(enforce_rbac=True) as api:
        api.cluster.create("namespaces", {"metadata": {"name": WEBHOOK_NAMESPACE}})
        api.auth.add_service_account_token(WEBHOOK_TOKEN, WEBHOOK_NAMESPACE, WEBHOOK_SA)
        api.auth.load_rbac(yaml.safe_load_all(WEBHOOK_RBAC.read_text()))
        yield api
