"""The planner (step 3 of admission): a pod in, the pod as it should be out. Pure.

No network call, no clock, no global state: the namespace's labels come in as data. The
mechanism (issue 6, "Constraints"; DESIGN.md, "Handing a model to a pod"):

- ``csi``: a CSI ephemeral inline volume of driver ``csi.modelcache.io`` at the mount path,
  read-only; the node's agent pulls the model (or finds it warm) and bind-mounts its tree
  before the containers start. No init container, no hostPath: allowed by every Pod Security
  level. Only where the driver is installed (``--csi``), and then the default everywhere.
- ``cache``: the model's own store directory ``<store>/models/<key>`` is a read-only
  hostPath at a side path (``/var/run/modelcache/model``); the mount path is an emptyDir that
  the init container fills with symlinks into the side path (warm node or agent-pulled) or
  with the files it downloads itself (fallback). App containers see both read-only. The
  hostPath's type is ``Directory``: kubelet never creates it (root-owned, the agent could not
  publish into it); the node's agent makes it as soon as the pod is bound (docs/store.md).
- ``download``: no hostPath (Pod Security ``baseline``/``restricted`` forbid it); the init
  container downloads into the emptyDir, through the agent's fetch engine semantics.
- ``pvc://``: the claim itself, read-only at the mount path; no init container.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .annotations import (
    CONTAINERS,
    CREDENTIALS,
    FALLBACK,
    INCLUDE,
    INJECTED,
    MODE,
    MOUNT_PATH,
    PLACEMENT,
    SIDE_PATH,
    SIZE,
    VERIFY,
    WARM_MEMORY,
    AnnotationError,
    ModelRequest,
    read,
    wants_model,
)
from .settings import INIT_CA_ENV, PlanSettings

INIT_NAME = "modelcache-init"
VOLUME_PREFIX = "modelcache-"
STORE_VOLUME = "modelcache-store"
MODEL_VOLUME = "modelcache-model"
TOKEN_VOLUME = "modelcache-token"  # noqa: S105 - a volume name
TMP_VOLUME = "modelcache-tmp"
CREDENTIALS_VOLUME = "modelcache-credentials"
TOKEN_DIR = "/var/run/secrets/modelcache"  # noqa: S105 - a path
TOKEN_FILE = TOKEN_DIR + "/token"
CREDENTIALS_DIR = "/var/run/modelcache/credentials"
TOKEN_AUDIENCE = "modelcache"  # noqa: S105 - an audience
CSI_DRIVER = "csi.modelcache.io"
TOKEN_SECONDS = 3600
#: the init container's /tmp (its root filesystem is read-only); downloads go to the mount
TMP_SIZE = "256Mi"
INIT_UID = 65532
AFFINITY_WEIGHT = 100
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
PSA_LEVELS = ("privileged", "baseline", "restricted")
NO_HOSTPATH_LEVELS = ("baseline", "restricted")
#: the init container's requests: its logs and /tmp on top of a fallback download
INIT_EPHEMERAL = 64 * 1024 * 1024
MiB = 1024 * 1024

JSON = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """The pod as it should be admitted (equal to the input when nothing is to change)."""

    pod: JSON
    warnings: tuple[str, ...] = ()
    mode: str | None = None
    """``csi``, ``cache``, ``download`` or ``pvc`` when the pod was mutated; None otherwise."""


@dataclass(frozen=True)
class Denial:
    """Why the pod may not be admitted, in words for the person who wrote it."""

    message: str
    annotation: str | None = None
    """The annotation at fault, if one is (bounded: a ``modelcache.io/*`` key)."""


class MalformedPod(ValueError):
    """The object is not shaped like a pod (the API server would never send it)."""


def plan(
    pod: Mapping[str, Any],
    namespace_labels: Mapping[str, str] | None,
    settings: PlanSettings,
    namespace: str | None = None,
) -> Plan | Denial:
    """Plan the mutation of ``pod``; ``namespace_labels`` None means they are unknown;
    ``namespace``: the review's (default: the pod's own ``metadata.namespace``)."""
    meta = _mapping(pod.get("metadata"), "metadata")
    if namespace is None:
        namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    spec = _mapping(pod.get("spec"), "spec")
    unchanged = Plan(pod=dict(pod))  # never changed, so no copy needed
    if not wants_model(annotations, labels):
        return unchanged
    containers = _containers(spec, "containers")
    init_containers = _containers(spec, "initContainers")
    if _mapping(spec.get("os"), "spec.os").get("name") == "windows":
        return Denial("modelcache mounts models into Linux pods only (spec.os.name is windows)")
    try:
        request = read(annotations, settings.allow_hosts, namespace or "")
    except AnnotationError as e:
        return Denial(str(e), e.annotation)
    refusal = _verify_refusal(request, namespace or "",
                              pod_security(namespace or "", namespace_labels, settings), settings)
    if refusal is not None:
        return refusal
    security = pod_security(namespace or "", namespace_labels, settings)
    mode = _mode(request, security, settings)
    if mode == "csi" and not settings.csi:
        return Denial(
            f"annotation {MODE}: csi needs the modelcache CSI driver ({CSI_DRIVER}), and this "
            "cluster's webhook runs without --csi (the driver is not installed)",
            MODE,
        )
    if _already_injected(request, mode, annotations, spec):
        return unchanged
    targets = _targets(request, containers, init_containers)
    if isinstance(targets, Denial):
        return targets
    conflict = _conflict(request, mode, spec, targets, init_containers + containers)
    if conflict is not None:
        return conflict
    if mode == "download" and request.fallback == "none":
        return Denial(
            f"annotation {FALLBACK}: none needs mode cache, but mode is download "
            + _mode_origin(request, security),
            FALLBACK,
        )
    if mode == "download" and request.reference.scheme == "file":
        return Denial(
            f"annotation {MODE}: file:// models come only from the node's agent; mode "
            "download cannot fetch them " + _mode_origin(request, security),
            MODE,
        )
    return _build(pod, request, mode, targets, namespace_labels, security, settings)


# --- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PodSecurity:
    """The Pod Security level enforced on the pod's namespace, and where it comes from."""

    level: str
    origin: str
    """``exempt`` (the admission configuration exempts the namespace), ``label`` (the
    namespace's ``enforce`` label) or ``default`` (the cluster's default level)."""

    @property
    def forbids_hostpath(self) -> bool:
        return self.level in NO_HOSTPATH_LEVELS

    def describe(self) -> str:
        if self.origin == "label":
            return f"Pod Security level {self.level!r} of this namespace"
        if self.origin == "default":
            return f"Pod Security level {self.level!r}, the cluster's default"
        return "no Pod Security level (the namespace is exempt)"


def pod_security(namespace: str, labels: Mapping[str, str] | None,
                 settings: PlanSettings) -> PodSecurity:
    """What the PodSecurity admission plugin enforces on a pod of ``namespace``: nothing in
    an exempt namespace; else the namespace's ``enforce`` label (a value that is no level
    is taken as ``restricted``, the safe reading); else the cluster's default (also when the
    labels are unknown)."""
    if namespace and namespace in settings.pod_security_exempt:
        return PodSecurity("privileged", "exempt")
    label = (labels or {}).get(PSA_ENFORCE)
    if label is not None:
        return PodSecurity(label if label in PSA_LEVELS else "restricted", "label")
    return PodSecurity(settings.pod_security_default, "default")


def _mode(request: ModelRequest, security: PodSecurity, settings: PlanSettings) -> str:
    if not request.reference.cached:
        return "pvc"
    if request.mode is not None:
        return request.mode
    if settings.csi:
        return "csi"  # allowed by every Pod Security level
    if security.forbids_hostpath:
        return "download"
    return "cache"


def _verify_refusal(request: ModelRequest, namespace: str,
                    security: PodSecurity, settings: PlanSettings) -> Denial | None:
    """A pod the signature rules do not let in: none named where the admin requires one, or
    one named where it cannot be checked (a claim, a download by the pod itself)."""
    if request.verify is None:
        if any(fnmatch.fnmatchcase(namespace, p) for p in settings.require_verify):
            return Denial(
                f"namespace {namespace} requires models to be signed: set {VERIFY} to the "
                "name of a ConfigMap here that holds the signature policy", VERIFY)
        return None
    if not request.reference.cached:
        return Denial(f"annotation {VERIFY}: a pvc:// model is mounted as it is and cannot "
                      "be verified", VERIFY)
    if _mode(request, security, settings) == "download":
        return Denial(
            f"annotation {VERIFY}: the signature is checked by the node's agent, and mode "
            "download bypasses it " + _mode_origin(request, security), VERIFY)
    return None


def _mode_origin(request: ModelRequest, security: PodSecurity) -> str:
    if request.mode is not None:
        return f"(set by {MODE})"
    return f"({security.describe()} forbids hostPath)"


def injected_value(request: ModelRequest, mode: str) -> str:
    """The value of ``modelcache.io/injected``: what was injected, as compact JSON."""
    return json.dumps({"key": request.reference.key, "mode": mode}, separators=(",", ":"))


def _already_injected(
    request: ModelRequest, mode: str, annotations: Mapping[str, Any], spec: Mapping[str, Any]
) -> bool:
    """A pod this webhook mutated already, for the same model: nothing more to do."""
    value = annotations.get(INJECTED)
    if not isinstance(value, str):
        return False
    try:
        marked = json.loads(value)
    except ValueError:
        return False
    if not isinstance(marked, dict) or marked.get("key") != request.reference.key:
        return False
    if request.mode is not None and marked.get("mode") != mode:
        return False
    volumes = {v.get("name") for v in _list(spec.get("volumes")) if isinstance(v, dict)}
    if MODEL_VOLUME not in volumes:
        return False
    if mode in ("pvc", "csi"):
        return True
    inits = [c.get("name") for c in _list(spec.get("initContainers")) if isinstance(c, dict)]
    return INIT_NAME in inits


def _targets(
    request: ModelRequest, containers: list[JSON], init_containers: list[JSON]
) -> list[JSON] | Denial:
    if request.containers is None:
        return containers
    by_name = {c["name"]: c for c in init_containers + containers}
    unknown = [name for name in request.containers if name not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        return Denial(
            f"annotation {CONTAINERS}: no container named {', '.join(unknown)} in the pod "
            f"(containers: {known})",
            CONTAINERS,
        )
    return [by_name[name] for name in request.containers]


def _conflict(
    request: ModelRequest,
    mode: str,
    spec: Mapping[str, Any],
    targets: list[JSON],
    all_containers: list[JSON],
) -> Denial | None:
    for volume in _list(spec.get("volumes")):
        name = volume.get("name") if isinstance(volume, dict) else None
        if isinstance(name, str) and name.startswith(VOLUME_PREFIX):
            return Denial(
                f"the pod already has a volume named {name}: names starting with "
                f"{VOLUME_PREFIX} are reserved for modelcache"
            )
    for container in all_containers:
        if container.get("name") == INIT_NAME:
            return Denial(f"the pod already has a container named {INIT_NAME}, which is reserved")
    paths = {request.mount_path: MOUNT_PATH}
    if mode == "cache":
        paths[SIDE_PATH] = "the model's side path"
    for container in targets:
        used = [m.get("mountPath") for m in _list(container.get("volumeMounts"))
                if isinstance(m, dict)]
        used += [d.get("devicePath") for d in _list(container.get("volumeDevices"))
                 if isinstance(d, dict)]
        for path in used:
            if isinstance(path, str) and posixpath.normpath(path) in paths:
                what = paths[posixpath.normpath(path)]
                hint = f"; set {MOUNT_PATH} to another path" if what == MOUNT_PATH else ""
                return Denial(
                    f"container {container['name']} already mounts something at {path} "
                    f"({what}){hint}",
                    MOUNT_PATH if what == MOUNT_PATH else None,
                )
    return None


# --- building the pod ----------------------------------------------------------------------


def _build(
    pod: Mapping[str, Any],
    request: ModelRequest,
    mode: str,
    targets: list[JSON],
    namespace_labels: Mapping[str, str] | None,
    security: PodSecurity,
    settings: PlanSettings,
) -> Plan:
    out = copy.deepcopy(dict(pod))
    spec = _obj(out, "spec")
    target_names = {c["name"] for c in targets}
    volumes = _volumes(request, mode, settings)
    _extend(spec, "volumes", volumes)
    app_mounts = _app_mounts(request, mode)
    for key in ("initContainers", "containers"):
        for container in _list(spec.get(key)):
            if container.get("name") in target_names:
                _extend(container, "volumeMounts", app_mounts)
    dns_warning = None
    if mode in ("cache", "download"):
        spec["initContainers"] = [_init_container(request, mode, settings),
                                  *_list(spec.get("initContainers"))]
        dns_warning = _host_network_dns(spec)
    if mode != "pvc":
        _add_affinity(spec, request)
    meta = _obj(out, "metadata")
    _obj(meta, "annotations")[INJECTED] = injected_value(request, mode)
    warnings = _warnings(request, mode, spec, namespace_labels, security)
    if dns_warning is not None:
        warnings.append(dns_warning)
    return Plan(pod=out, warnings=tuple(warnings), mode=mode)


def _host_network_dns(spec: JSON) -> str | None:
    """A hostNetwork pod resolves names as its node does unless its DNS policy is
    ``ClusterFirstWithHostNet`` (``ClusterFirst``, the default, falls back to the node's
    resolver): its init container could not find the agent's Service. The policy is set
    when it was the default; a pod that chose ``Default`` or ``None`` is told."""
    if spec.get("hostNetwork") is not True:
        return None
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if policy == "ClusterFirst":
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        return "hostNetwork: dnsPolicy set to ClusterFirstWithHostNet to reach the agent"
    if policy != "ClusterFirstWithHostNet":
        return f"hostNetwork with dnsPolicy {str(policy)[:16]}: the agent may not resolve"
    return None


def _volumes(request: ModelRequest, mode: str, settings: PlanSettings) -> list[JSON]:
    ref = request.reference
    if mode == "pvc":
        claim: JSON = {"claimName": ref.host, "readOnly": True}
        return [{"name": MODEL_VOLUME, "persistentVolumeClaim": claim}]
    if mode == "csi":
        return [{"name": MODEL_VOLUME, "csi": {"driver": CSI_DRIVER, "readOnly": True,
                                               "volumeAttributes": _attributes(request)}}]
    volumes: list[JSON] = []
    if mode == "cache":
        host_path = posixpath.join(settings.store_path, "models", ref.key)
        # Directory, not DirectoryOrCreate: kubelet waits for the agent to make it (the pod
        # watch does, as the pod is bound) rather than make one the agent cannot publish into
        volumes.append({"name": STORE_VOLUME, "hostPath": {"path": host_path, "type": "Directory"}})
    empty: JSON = {}
    limit = _size_limit(request, settings)
    if limit is not None:
        empty["sizeLimit"] = limit
    volumes += [
        {"name": MODEL_VOLUME, "emptyDir": empty},
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": TOKEN_SECONDS, "path": "token",
        }}]}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]
    if request.credentials is not None:
        volumes.append(
            {"name": CREDENTIALS_VOLUME, "secret": {"secretName": request.credentials}}
        )
    return volumes


def _attributes(request: ModelRequest) -> dict[str, str]:
    """The CSI volume's attributes: what the agent needs to ensure the model for the pod."""
    attributes = {"model": request.uri}
    if request.reference.include:
        attributes["include"] = ",".join(request.reference.include)
    if request.credentials is not None:
        attributes["credentials"] = request.credentials  # read in the pod's namespace
    if request.verify is not None:
        attributes["verify"] = request.verify  # the policy, a ConfigMap of the pod's namespace
    return attributes


def _size_limit(request: ModelRequest, settings: PlanSettings) -> str | None:
    """The fallback emptyDir's limit, in whole MiB: what the download holds at its peak, plus
    headroom. That is the model's size, or twice it where the pull may unpack an archive (a
    tar layer, an archive URL): the archive and its unpacked files are on disk at once."""
    needed = _fallback_bytes(request, settings)
    return None if needed is None else f"{max(math.ceil(needed / MiB), 1)}Mi"


def _fallback_bytes(request: ModelRequest, settings: PlanSettings) -> int | None:
    if request.size_bytes is None or request.fallback == "none":
        return None
    copies = 2 if request.reference.may_unpack else 1
    return math.ceil(request.size_bytes * (copies + settings.size_headroom))


def _resources(request: ModelRequest, settings: PlanSettings) -> JSON:
    """Requests and limits every ResourceQuota kind can count: CPU and memory both, and an
    ephemeral-storage request for what the pod may write through the init container (its
    logs, and a fallback download of known size). No ephemeral-storage limit: kubelet sums
    the containers' limits into the pod's and counts the emptyDirs against it, so a limit
    here would cap the app containers' scratch space too."""
    ephemeral = INIT_EPHEMERAL + (_fallback_bytes(request, settings) or 0)
    return {"requests": {"cpu": "100m", "memory": "128Mi",
                         "ephemeral-storage": f"{math.ceil(ephemeral / MiB)}Mi"},
            "limits": {"cpu": settings.init_cpu_limit, "memory": "512Mi"}}


def _app_mounts(request: ModelRequest, mode: str) -> list[JSON]:
    model: JSON = {"name": MODEL_VOLUME, "mountPath": request.mount_path, "readOnly": True}
    if mode == "pvc" and request.reference.path:
        model["subPath"] = request.reference.path
    if mode != "cache":
        return [model]
    side = {"name": STORE_VOLUME, "mountPath": SIDE_PATH, "readOnly": True}
    return [side, model]


def init_command(request: ModelRequest, mode: str, settings: PlanSettings) -> list[str]:
    """The injected init container's command line (``modelcache init``)."""
    command = [
        "modelcache", "init",
        "--uri", request.uri,
        "--mount-path", request.mount_path,
        "--side-path", SIDE_PATH,
        "--agent-url", settings.agent_url,
        "--token-file", TOKEN_FILE,
        "--fallback", "source" if mode == "download" else request.fallback,
        "--mode", mode,
    ]
    if request.reference.include:
        command += ["--include", ",".join(request.reference.include)]
    if request.credentials is not None:
        # the name lets the agent read the Secret in the pod's namespace itself; the
        # mounted copy serves the fallback download
        command += ["--credentials", request.credentials, "--credentials-dir", CREDENTIALS_DIR]
    if request.verify is not None:
        command += ["--verify", request.verify]
    return command


def _init_container(request: ModelRequest, mode: str, settings: PlanSettings) -> JSON:
    mounts: list[JSON] = []
    if mode == "cache":
        mounts.append({"name": STORE_VOLUME, "mountPath": SIDE_PATH, "readOnly": True})
    mounts += [
        {"name": MODEL_VOLUME, "mountPath": request.mount_path},
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's
    ]
    if request.credentials is not None:
        mounts.append({"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True})
    return {
        "name": INIT_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": init_command(request, mode, settings),
        "env": [{"name": "MODELCACHE_NODE_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                # the key's scopes name the namespace (its Secret, its policy)
                *([{"name": "MODELCACHE_NAMESPACE",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
                  if request.verify is not None or request.credentials is not None else []),
                *({"name": name, "value": value} for name, value in settings.init_env),
                *([{"name": INIT_CA_ENV, "value": settings.init_ca_pem}]
                  if settings.init_ca_pem else [])],
        "resources": _resources(request, settings),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": INIT_UID,
            "runAsGroup": INIT_UID,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }


def _add_affinity(spec: JSON, request: ModelRequest) -> None:
    """Steer the pod to nodes where the model is warm, keeping every rule it had."""
    expression = {"key": request.reference.node_label, "operator": "In", "values": ["ready"]}
    node = _obj(_obj(spec, "affinity"), "nodeAffinity")
    if request.placement == "require-warm":
        required = _obj(node, "requiredDuringSchedulingIgnoredDuringExecution")
        terms = [t for t in _list(required.get("nodeSelectorTerms")) if isinstance(t, dict)]
        # terms are ORed: the model must be warm whichever term a node satisfies
        live = [t for t in terms if t.get("matchExpressions") or t.get("matchFields")]
        if not live:
            required["nodeSelectorTerms"] = [*terms, {"matchExpressions": [expression]}]
        for term in live:
            _extend(term, "matchExpressions", [expression])
        return
    preference = {"weight": AFFINITY_WEIGHT, "preference": {"matchExpressions": [expression]}}
    _extend(node, "preferredDuringSchedulingIgnoredDuringExecution", [preference])


def _warnings(
    request: ModelRequest, mode: str, spec: Mapping[str, Any],
    namespace_labels: Mapping[str, str] | None, security: PodSecurity,
) -> list[str]:
    warnings = [f"unknown annotation {key} ignored" for key in request.unknown]
    if mode == "pvc":
        for key in (INCLUDE, CREDENTIALS, MODE, FALLBACK, SIZE, PLACEMENT, WARM_MEMORY):
            if key in request.explicit:
                warnings.append(f"{key} has no effect on a pvc:// model (the claim is mounted)")
        return warnings
    if mode == "csi":
        warnings += [f"{key} has no effect in mode csi (the node's agent pulls)"
                     for key in (FALLBACK, SIZE) if key in request.explicit]
    else:
        warnings += _init_warnings(request, mode, namespace_labels, security)
    if request.placement == "require-warm" and spec.get("nodeName"):
        warnings.append("spec.nodeName is set: kubelet rejects the pod unless that node is warm")
    return warnings


def _init_warnings(
    request: ModelRequest, mode: str, namespace_labels: Mapping[str, str] | None,
    security: PodSecurity,
) -> list[str]:
    """What to say about a pod whose init container provides the model."""
    warnings = []
    if namespace_labels is None and request.mode is None and security.origin != "exempt":
        warnings.append(
            f"namespace labels unknown to the webhook: chose mode {mode} (set {MODE} to choose)"
        )
    if mode == "cache" and security.forbids_hostpath:
        warnings.append(
            f"mode cache mounts a hostPath, which Pod Security level {security.level!r} here "
            "rejects")
    if request.verify is not None:
        if FALLBACK in request.explicit and request.fallback == "source":
            warnings.append(f"{FALLBACK} source has no effect with {VERIFY}: only the agent's "
                            "verified copy is used")
    elif request.fallback == "source" and request.size_bytes is None:
        warnings.append(
            f"{SIZE} not set: a fallback download counts against ephemeral storage, no limit known"
        )
    if request.reference.scheme == "file" and request.fallback == "source":
        warnings.append("file:// models come only from the node's agent: no fallback from source")
    return warnings


# --- tolerant access to an object that should be a pod -------------------------------------


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedPod(f"{where} is not an object")
    return value


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _containers(spec: Mapping[str, Any], key: str) -> list[JSON]:
    items = spec.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in items
    ):
        raise MalformedPod(f"spec.{key} is not a list of named containers")
    return items


def _obj(parent: JSON, key: str) -> JSON:
    """``parent[key]`` as a dict, created when missing or null."""
    value = parent.get(key)
    if not isinstance(value, dict):
        value = {}
        parent[key] = value
    return value


def _extend(parent: JSON, key: str, items: list[JSON]) -> None:
    parent[key] = [*_list(parent.get(key)), *copy.deepcopy(items)]

