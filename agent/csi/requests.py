"""NodePublishVolume and NodeUnpublishVolume requests, validated into plain values.

Everything kubelet sends is checked here, before anything else happens: the volume id, the
target path (absolute, clean, under kubelet's ``pods/`` directory), the capability (a mount,
never a block device; any access mode, always mounted read-only), the volume's attributes
(``model`` in the reference grammar every part of modelcache uses, ``include``,
``credentials``) and the pod information and service-account tokens kubelet adds
(``podInfoOnMount``, ``tokenRequests``). A problem raises :class:`InvalidInput` naming the
field; tokens never appear in a message or a ``repr``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.csi.proto import csi_pb2 as pb
from common.errors import InvalidInput, InvalidReference
from common.reference import Reference, check_policy_name, parse, scoped

MODEL = "model"
INCLUDE = "include"
CREDENTIALS = "credentials"
VERIFY = "verify"
ATTRIBUTES = (MODEL, INCLUDE, CREDENTIALS, VERIFY)
#: keys kubelet adds to the volume context (podInfoOnMount, tokenRequests, inline volumes)
KUBELET_PREFIX = "csi.storage.k8s.io/"
POD_NAME = KUBELET_PREFIX + "pod.name"
POD_NAMESPACE = KUBELET_PREFIX + "pod.namespace"
POD_UID = KUBELET_PREFIX + "pod.uid"
SERVICE_ACCOUNT = KUBELET_PREFIX + "serviceAccount.name"
TOKENS = KUBELET_PREFIX + "serviceAccount.tokens"
MAX_ID_BYTES = 1024
MAX_PATH_BYTES = 4096
MOUNT_FLAGS = frozenset({"ro"})
_SECRET = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Mode = pb.VolumeCapability.AccessMode.Mode


@dataclass(frozen=True)
class PodInfo:
    """Who the volume is for, as kubelet says (checked by :mod:`agent.csi.access`)."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    service_account: str | None = None
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Service-account token by audience (kubelet's ``tokenRequests``); never shown."""

    @property
    def key(self) -> str | None:
        return f"{self.namespace}/{self.name}" if self.namespace and self.name else None


@dataclass(frozen=True)
class Publish:
    volume_id: str
    target: Path
    ref: Reference
    uri: str
    """``model`` as written."""
    credentials: str | None
    pod: PodInfo
    verify: str | None = None
    """The signature policy the model must pass (a ConfigMap of the pod's namespace)."""

    def reference(self, namespace: str | None) -> Reference:
        """The model's reference for the pod in ``namespace``: its credentials and its policy
        in the key's scopes, as the webhook and the init container name it."""
        return scoped(self.uri, self.ref.include or None, namespace=namespace,
                      credentials=self.credentials, verify=self.verify)


@dataclass(frozen=True)
class Unpublish:
    volume_id: str
    target: Path


def publish_request(req: pb.NodePublishVolumeRequest, pods_dir: Path) -> Publish:
    volume_id = _volume_id(req.volume_id)
    target = _target(req.target_path, pods_dir)
    _capability(req)
    context = dict(req.volume_context)
    unknown = sorted(k for k in context if k not in ATTRIBUTES and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise InvalidInput(f"volumeAttributes: unknown attribute(s) {', '.join(unknown)} "
                           f"(known: {', '.join(ATTRIBUTES)})")
    uri = context.get(MODEL, "").strip()
    if not uri:
        raise InvalidInput("volumeAttributes.model is required: the model's URI, "
                           "e.g. hf://org/name")
    include = context.get(INCLUDE) or None
    try:
        ref = parse(uri, include)
    except InvalidInput as e:
        raise InvalidReference(f"volumeAttributes: {e}") from None
    if not ref.cached:
        raise InvalidInput(f"volumeAttributes.model: {ref.scheme}:// models are not cached; "
                           "mount the claim itself")
    credentials = context.get(CREDENTIALS, "").strip() or None
    if credentials is not None and not _SECRET.match(credentials):
        raise InvalidInput(f"volumeAttributes.credentials: {credentials[:64]!r} is not a "
                           "Secret name (lowercase DNS-1123 subdomain)")
    verify = context.get(VERIFY, "").strip() or None
    if verify is not None:
        try:
            check_policy_name(verify)
        except InvalidInput as e:
            raise InvalidInput(f"volumeAttributes.verify: {e}") from None
    return Publish(volume_id, target, ref, uri, credentials, _pod(context), verify)


def unpublish_request(req: pb.NodeUnpublishVolumeRequest, pods_dir: Path) -> Unpublish:
    return Unpublish(_volume_id(req.volume_id), _target(req.target_path, pods_dir))


def _volume_id(value: str) -> str:
    if not value:
        raise InvalidInput("volume_id is required")
    if len(value.encode()) > MAX_ID_BYTES or _CONTROL.search(value):
        raise InvalidInput(f"volume_id must be at most {MAX_ID_BYTES} bytes without "
                           "control characters")
    return value


def _target(value: str, pods_dir: Path) -> Path:
    if not value:
        raise InvalidInput("target_path is required")
    if len(value.encode()) > MAX_PATH_BYTES or _CONTROL.search(value):
        raise InvalidInput("target_path is too long or has control characters")
    if not value.startswith("/") or posixpath.normpath(value) != value.rstrip("/"):
        raise InvalidInput(f"target_path {value!r} is not an absolute, clean path")
    target = Path(value)
    if not target.is_relative_to(pods_dir) or target == pods_dir:
        raise InvalidInput(f"target_path {value!r} is not under kubelet's {pods_dir} "
                           "(see --csi-kubelet-dir)")
    return target


def _capability(req: pb.NodePublishVolumeRequest) -> None:
    if not req.HasField("volume_capability"):
        raise InvalidInput("volume_capability is required")
    cap = req.volume_capability
    if cap.HasField("block"):
        raise InvalidInput("volume_capability: a model is a directory; block access is not "
                           "supported")
    if not cap.HasField("mount"):
        raise InvalidInput("volume_capability: the access type (mount) is required")
    flags = set(cap.mount.mount_flags) - MOUNT_FLAGS
    if flags:
        raise InvalidInput(f"volume_capability.mount.mount_flags {sorted(flags)} are not "
                           "supported (models are always mounted ro,nosuid,nodev)")
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidInput("volume_capability.access_mode is required")


def _pod(context: Mapping[str, str]) -> PodInfo:
    return PodInfo(
        name=context.get(POD_NAME) or None,
        namespace=context.get(POD_NAMESPACE) or None,
        uid=context.get(POD_UID) or None,
        service_account=context.get(SERVICE_ACCOUNT) or None,
        tokens=_tokens(context.get(TOKENS)),
    )


def _tokens(value: str | None) -> dict[str, str]:
    """kubelet's ``{"<audience>": {"token": "...", "expirationTimestamp": "..."}}``."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("token"), str) for v in data.values()):
        raise InvalidInput(f"{TOKENS} is not the JSON kubelet sends "
                           '({"<audience>": {"token": ..., "expirationTimestamp": ...}})')
    return {str(audience): v["token"] for audience, v in data.items()}
