"""The one client of the Kubernetes API, for both programs (the only module importing
kubernetes_asyncio): configuration, the API calls, and the translation of every refusal into
the project's errors (``common.kube.errors``). The list/watch loop is ``informer.py``.

Configuration (:func:`connect`): a kubeconfig file, or the pod's service account (its token
re-read as kubelet rotates it). A kubeconfig may carry tokens, client certificates (files or
inline data) and exec plugins, as kubectl's does. Inline keys and certificates are written
by the library to files (Python's ``ssl`` loads keys only from files): here into a private
directory that is removed as soon as the client has loaded them, never left behind.
:func:`find_config` looks for one the way controller-runtime does (the webhook, which may run
without one).

What the programs need from a cluster, as plain JSON objects (``dict``s shaped as the
apiserver sends them, never client model classes):

- informers (``watch_cached_models``, ``watch_pods_on_node``, ``watch_node``,
  ``watch_namespaces``): see ``informer.py``;
- writes that never conflict with other writers: node labels by merge patch on the agent's
  own ``modelcache.io/m-*`` keys; the agent's own NodeCache (named after its node, written
  by no one else: created once, then merge patches of its ``status``); a CachedModel's
  summary counts (``status.ready/pulling/failed``) by merge patch on the status
  subresource, written only by the counts controller that holds the Lease (``lease.py``);
- Leases (coordination.k8s.io/v1: get, create, and replace at the resourceVersion read);
- Events (events.k8s.io/v1, best effort), TokenReview, SubjectAccessReview, Secrets (decoded,
  never logged);
- for ``modelcache webhook certs``: its Secret as stored (get, create, replace at the
  resourceVersion read) and a JSON patch of its MutatingWebhookConfiguration.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import OpenApiException
from kubernetes_asyncio.config import kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

from common.errors import (
    InvalidInput,
    KubeError,
    ModelcacheError,
    TransientError,
)
from common.kube.errors import api_error, describe
from common.kube.informer import Informer, Obj
from common.kube.settings import KubeSettings
from common.reference import LABEL_PREFIX

log = logging.getLogger(__name__)

GROUP = "modelcache.io"
VERSION = "v1alpha1"
PLURAL = "cachedmodels"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
NODE_CACHES = "nodecaches"
#: the fields of an entry of a NodeCache's ``status.models`` (see its CRD)
MODEL_ENTRY_FIELDS = ("namespace", "name", "uid", "key", "state", "revision", "bytes",
                      "lastTransitionTime", "message", "verified")
COUNTED_STATES = ("ready", "pulling", "failed")
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NOTE_BYTES = 1024


@dataclass(frozen=True)
class TokenReview:
    authenticated: bool
    user: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    #: e.g. ``authentication.kubernetes.io/pod-name`` and ``.../node-name`` of a bound token
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    #: why the token was refused (never contains the token)
    error: str = ""


async def connect(
    kubeconfig: str | None,
    settings: KubeSettings | None = None,
    *,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    environ: Mapping[str, str] | None = None,
    instance: str | None = None,
) -> KubeClient:
    """A client from a kubeconfig file (``kubeconfig``, else ``settings.kubeconfig``), or from
    the pod's service account when neither is set (its token re-read as kubelet rotates
    it). ``instance`` names this agent in Events (default: the host name)."""
    settings = settings or KubeSettings()
    if not kubeconfig and settings.kubeconfig is not None:
        kubeconfig = str(settings.kubeconfig)
    cfg = k8s.Configuration()
    with tempfile.TemporaryDirectory(prefix="modelcache-kube-") as private:
        try:
            if kubeconfig:
                await k8s_config.load_kube_config(
                    config_file=kubeconfig, client_configuration=cfg, persist_config=False,
                    temp_file_path=private,
                )
            else:
                k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg,
                    token_filename=str(service_account_dir / "token"),
                    cert_filename=str(service_account_dir / "ca.crt"),
                    environ=dict(environ if environ is not None else os.environ),
                )
            api = k8s.ApiClient(cfg)  # its SSL context has read the key and CA files now
        except (ConfigException, OSError, ValueError, KeyError, TypeError,
                yaml.YAMLError) as e:
            where = kubeconfig or "in-cluster service account"
            raise InvalidInput(
                f"cannot configure the Kubernetes client from {where}: {e}") from e
        finally:
            _forget_files_in(private)
    return KubeClient(api, settings, instance or socket.gethostname())


def _forget_files_in(directory: str) -> None:
    """kubernetes_asyncio remembers each file it wrote for inline data, by content, to hand
    the same path out again on the next load; those in our directory (removed now) must be
    forgotten, or connecting again with the same kubeconfig would name a missing file."""
    written = getattr(kube_config, "_temp_files", None)
    if isinstance(written, dict):
        for content, path in list(written.items()):
            if os.path.dirname(str(path)) == directory:
                del written[content]


@dataclass(frozen=True)
class Found:
    """Where a cluster's configuration was found."""

    kubeconfig: Path | None
    """A kubeconfig file; ``None``: the in-cluster service account."""

    @property
    def source(self) -> str:
        """For the log (never a secret)."""
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster"


def find_config(
    env: Mapping[str, str], home: Path | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> tuple[Found | None, str]:
    """The cluster configuration as controller-runtime's ``GetConfig`` finds it:
    ``$KUBECONFIG`` (its first file only), else the in-cluster service account, else
    ``~/.kube/config``; or None and why there is none."""
    if env.get("KUBECONFIG"):
        path = Path(env["KUBECONFIG"].split(os.pathsep)[0])
        if not path.is_file():
            return None, f"KUBECONFIG file {path} does not exist"
        return Found(path), ""
    if (env.get("KUBERNETES_SERVICE_HOST") and env.get("KUBERNETES_SERVICE_PORT")
            and (service_account_dir / "token").is_file()):
        return Found(None), ""
    default = (home or Path.home()) / ".kube" / "config"
    if default.is_file():
        return Found(default), ""
    return None, "no in-cluster service account and no kubeconfig"


class KubeClient:
    """A typed facade over the few API calls the two programs make."""

    def __init__(self, api: k8s.ApiClient, settings: KubeSettings, instance: str) -> None:
        self._api = api
        self.settings = settings
        self.instance = instance
        self._core = k8s.CoreV1Api(api)
        self._custom = k8s.CustomObjectsApi(api)
        self._events = k8s.EventsV1Api(api)
        self._authn = k8s.AuthenticationV1Api(api)
        self._authz = k8s.AuthorizationV1Api(api)
        self._admission = k8s.AdmissionregistrationV1Api(api)
        self._coordination = k8s.CoordinationV1Api(api)

    async def close(self) -> None:
        await self._api.close()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- informers -----------------------------------------------------------------------

    def watch_cached_models(
        self, namespace: str | None = None, label_selector: str | None = None
    ) -> Informer:
        """CachedModels of one namespace, or of all namespaces."""
        if namespace:
            lister = _bind(self._custom.list_namespaced_custom_object, GROUP, VERSION,
                           namespace, PLURAL)
        else:
            lister = _bind(self._custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        return Informer(self, "cachedmodels", lister, label_selector=label_selector)

    def watch_node_caches(self) -> Informer:
        """Every node's NodeCache (the counts controller sums them)."""
        return Informer(self, NODE_CACHES, _bind(self._custom.list_cluster_custom_object,
                                                 GROUP, VERSION, NODE_CACHES))

    def watch_pods_on_node(self, node: str, label_selector: str | None = None) -> Informer:
        """Pods bound to ``node`` in every namespace (field selector ``spec.nodeName``)."""
        return Informer(self, "pods", self._core.list_pod_for_all_namespaces,
                        field_selector=f"spec.nodeName={node}", label_selector=label_selector)

    def watch_node(self, node: str) -> Informer:
        """The agent's own Node (its labels decide which CachedModels select it)."""
        return Informer(self, "nodes", self._core.list_node,
                        field_selector=f"metadata.name={node}")

    def watch_namespaces(self) -> Informer:
        """Every Namespace (the webhook reads their Pod Security labels)."""
        return Informer(self, "namespaces", self._core.list_namespace)

    # --- reads ---------------------------------------------------------------------------

    async def get_node(self, name: str) -> Obj:
        return await self.call_json(f"get node {name}", self._core.read_node, name)

    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, decoded to text. The values are never logged nor put in errors."""
        what = f"read secret {namespace}/{name}"
        obj = await self.get_secret(namespace, name)
        out: dict[str, str] = {}
        for key, value in (obj.get("data") or {}).items():
            try:
                out[key] = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                # ``from None``: the decoding error would quote bytes of the secret
                raise InvalidInput(f"{what}: key {key!r} is not base64 UTF-8 text") from None
        return out

    async def get_secret(self, namespace: str, name: str) -> Obj:
        """A Secret as stored (``type``, ``metadata``, ``data`` in base64), to be written back
        whole. Never logged."""
        return await self.call_json(f"read secret {namespace}/{name}",
                                    self._core.read_namespaced_secret, name, namespace)

    async def get_mutating_webhook_configuration(self, name: str) -> Obj:
        return await self.call_json(
            f"get mutatingwebhookconfiguration {name}",
            self._admission.read_mutating_webhook_configuration, name)

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        """A ConfigMap's ``data`` (a signature policy; ``binaryData`` is not read)."""
        obj = await self.call_json(f"read configmap {namespace}/{name}",
                                   self._core.read_namespaced_config_map, name, namespace)
        return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

    # --- writes --------------------------------------------------------------------------

    async def create_secret(self, namespace: str, body: Obj) -> Obj:
        return await self.call_json(
            f"create secret {namespace}/{(body.get('metadata') or {}).get('name', '')}",
            self._core.create_namespaced_secret, namespace, body)

    async def replace_secret(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT the whole Secret; with the resourceVersion it was read at in ``body``, a
        Secret changed since is not overwritten (``Conflict``)."""
        return await self.call_json(f"replace secret {namespace}/{name}",
                                    self._core.replace_namespaced_secret, name, namespace, body)

    async def patch_mutating_webhook_configuration(
        self, name: str, operations: list[Obj]
    ) -> Obj:
        """A JSON patch (RFC 6902); a failed ``test`` operation is ``Invalid``."""
        return await self.call_json(
            f"patch mutatingwebhookconfiguration {name}",
            self._admission.patch_mutating_webhook_configuration, name, operations,
            _content_type=JSON_PATCH)

    async def patch_node_labels(
        self, node: str, add: Mapping[str, str], remove: Iterable[str] = ()
    ) -> None:
        """Set and remove this agent's ``modelcache.io/m-*`` labels on ``node`` (a merge patch:
        no other label is read or written, so it never conflicts with kubelet or admins)."""
        remove = list(remove)
        for key in [*add, *remove]:
            if not key.startswith(LABEL_PREFIX) or len(key.split("/", 1)[1]) > 63:
                raise InvalidInput(f"refusing to touch node label {key!r}: not a model label")
        for key, value in add.items():
            if not _LABEL_VALUE.match(value):
                raise InvalidInput(f"invalid value {value!r} for node label {key!r}")
        both = set(add) & set(remove)
        if both:
            raise InvalidInput(f"node labels both added and removed: {sorted(both)}")
        labels: dict[str, str | None] = {**add, **dict.fromkeys(remove)}
        if not labels:
            return
        await self.call_json(
            f"patch labels of node {node}", self._core.patch_node, node,
            {"metadata": {"labels": labels}}, _content_type=MERGE_PATCH,
        )

    async def get_node_cache(self, node: str) -> Obj:
        return await self.call_json(f"get nodecache {node}",
                                    self._custom.get_cluster_custom_object,
                                    GROUP, VERSION, NODE_CACHES, node)

    async def create_node_cache(self, node: Obj, status: Mapping[str, Any]) -> Obj:
        """Create the NodeCache of ``node`` (the Node object: its owner, so that the garbage
        collector deletes it with the node) holding ``status``."""
        meta = node.get("metadata") or {}
        owner = {"apiVersion": "v1", "kind": "Node", "name": meta.get("name", ""),
                 "uid": meta.get("uid", "")}
        metadata: Obj = {"name": owner["name"]}
        if owner["uid"]:  # (an agent whose Node is not found yet creates it unowned)
            metadata["ownerReferences"] = [owner]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeCache", "metadata": metadata,
                "status": _checked_status(owner["name"], status)}
        return await self.call_json(f"create nodecache {owner['name']}",
                                    self._custom.create_cluster_custom_object,
                                    GROUP, VERSION, NODE_CACHES, body)

    async def patch_node_cache(self, node: str, status: Mapping[str, Any]) -> Obj:
        """Make the NodeCache's ``status`` exactly ``status`` (a merge patch: its list of
        models is replaced whole; its only writer is this node's agent)."""
        body = {"status": {**dict.fromkeys(("models", *COUNTED_STATES, "bytes")),
                           **_checked_status(node, status)}}
        return await self.call_json(f"patch nodecache {node}",
                                    self._custom.patch_cluster_custom_object,
                                    GROUP, VERSION, NODE_CACHES, node, body,
                                    _content_type=MERGE_PATCH)

    async def patch_cached_model_counts(self, namespace: str, name: str,
                                        counts: Mapping[str, int]) -> Obj:
        """Set a CachedModel's summary counts (``status.ready/pulling/failed``)."""
        unknown = set(counts) - set(COUNTED_STATES)
        if unknown:
            raise InvalidInput(f"unknown counts {sorted(unknown)}; allowed {COUNTED_STATES}")
        return await self.call_json(
            f"patch status of cachedmodel {namespace}/{name}",
            self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, PLURAL, name, {"status": dict(counts)},
            _content_type=MERGE_PATCH,
        )

    async def get_lease(self, namespace: str, name: str) -> Obj:
        return await self.call_json(f"get lease {namespace}/{name}",
                                    self._coordination.read_namespaced_lease, name, namespace)

    async def create_lease(self, namespace: str, body: Obj) -> Obj:
        name = (body.get("metadata") or {}).get("name", "")
        return await self.call_json(f"create lease {namespace}/{name}",
                                    self._coordination.create_namespaced_lease, namespace, body)

    async def replace_lease(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT the Lease; with the resourceVersion it was read at in ``body``, a Lease
        changed since (another holder) is not overwritten (``Conflict``)."""
        return await self.call_json(f"replace lease {namespace}/{name}",
                                    self._coordination.replace_namespaced_lease, name,
                                    namespace, body)

    async def emit_event(
        self,
        involved: Obj,
        reason: str,
        message: str,
        type: Literal["Normal", "Warning"] = "Normal",
        action: str | None = None,
    ) -> bool:
        """Record an events.k8s.io/v1 Event about ``involved`` (a CachedModel, a Node).
        Best effort: a failure is logged and returns False, never raised."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        regarding = {
            "apiVersion": involved.get("apiVersion", ""),
            "kind": involved.get("kind", ""),
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", ""),
            "uid": meta.get("uid", ""),
        }
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{regarding['name'][:230]}.{time.time_ns():x}",
                         "namespace": namespace},
            "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": self.settings.event_controller,
            "reportingInstance": self.instance[:128],
            "action": (action or reason)[:128],
            "reason": reason[:128],
            "note": _truncate(message, _NOTE_BYTES),
            "type": type,
            "regarding": {k: v for k, v in regarding.items() if v},
        }
        try:
            await self.call_json(f"create event {reason} about {regarding['name']}",
                                 self._events.create_namespaced_event, namespace, body)
        except ModelcacheError as e:
            log.warning("event not recorded: %s", e)
            return False
        return True

    # --- reviews -------------------------------------------------------------------------

    async def token_review(self, token: str, audiences: Iterable[str] = ()) -> TokenReview:
        """Who ``token`` belongs to, if the cluster vouches for it for one of ``audiences``."""
        audiences = list(audiences)
        if not token:
            return TokenReview(False, error="no token")
        spec: Obj = {"token": token}
        if audiences:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        out = await self.call_json("create tokenreview", self._authn.create_token_review, body)
        status = out.get("status") or {}
        user = status.get("user") or {}
        granted = tuple(status.get("audiences") or ())
        ok = bool(status.get("authenticated"))
        if ok and audiences and not set(granted) & set(audiences):
            return TokenReview(False, error="token not valid for this audience")
        return TokenReview(
            ok,
            user=user.get("username", "") if ok else "",
            uid=user.get("uid", "") if ok else "",
            groups=tuple(user.get("groups") or ()) if ok else (),
            extra={k: tuple(v) for k, v in (user.get("extra") or {}).items()} if ok else {},
            audiences=granted,
            error=status.get("error", ""),
        )

    async def subject_access_review(
        self,
        user: str,
        groups: Iterable[str],
        verb: str,
        resource: str,
        namespace: str = "",
        name: str = "",
        *,
        group: str = "",
        subresource: str = "",
        uid: str = "",
        extra: Mapping[str, Iterable[str]] | None = None,
    ) -> bool:
        """Whether the cluster's authorizers let ``user`` do ``verb`` on the resource."""
        attrs = {"verb": verb, "group": group, "resource": resource, "subresource": subresource,
                 "namespace": namespace, "name": name}
        spec: Obj = {
            "user": user,
            "groups": list(groups),
            "resourceAttributes": {k: v for k, v in attrs.items() if v},
        }
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = {k: list(v) for k, v in extra.items()}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        out = await self.call_json("create subjectaccessreview",
                                   self._authz.create_subject_access_review, body)
        status = out.get("status") or {}
        return bool(status.get("allowed")) and not status.get("denied")

    # --- transport -----------------------------------------------------------------------

    async def call_json(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                        **kwargs: Any) -> Obj:
        """Send a request; the reply's JSON object (any other reply becomes one of our
        errors)."""
        resp = await self.open(what, call, *args, **kwargs)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransientError(f"{what}: reading the reply failed: {describe(e)}") from e
        finally:
            resp.release()
        try:
            out = json.loads(raw)
        except ValueError as e:
            raise TransientError(f"{what}: the reply is not JSON") from e
        if not isinstance(out, dict):
            raise TransientError(f"{what}: the reply is not a JSON object")
        return out

    async def open(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                   **kwargs: Any) -> aiohttp.ClientResponse:
        """Send a request; a reply other than 2xx becomes one of our errors."""
        kwargs.setdefault("_request_timeout", self.settings.request_timeout)
        try:
            resp = await call(*args, _preload_content=False, **kwargs)
        except OpenApiException as e:
            raise KubeError(f"{what}: {e}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise TransientError(f"{what}: Kubernetes API unreachable: {describe(e)}") from e
        assert isinstance(resp, aiohttp.ClientResponse)
        if resp.status < 300:
            return resp
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        finally:
            resp.release()
        raise api_error(what, resp.status, raw, resp.headers.get("Retry-After"))


def _checked_status(node: str, status: Mapping[str, Any]) -> Obj:
    """A NodeCache's status as the CRD allows it (``InvalidInput`` naming what is not)."""
    unknown = set(status) - {"models", *COUNTED_STATES, "bytes"}
    if unknown:
        raise InvalidInput(f"invalid status of nodecache {node}: unknown fields {sorted(unknown)}")
    for entry in status.get("models") or []:
        extra = set(entry) - set(MODEL_ENTRY_FIELDS)
        if extra or not all(entry.get(k) for k in ("namespace", "name", "state")):
            raise InvalidInput(f"invalid entry in nodecache {node}: fields {sorted(entry)}; "
                               f"needs namespace, name and state, allows {MODEL_ENTRY_FIELDS}")
    return dict(status)


def _bind(call: Callable[..., Awaitable[Any]], *args: Any) -> Callable[..., Awaitable[Any]]:
    async def bound(**kwargs: Any) -> Any:
        return await call(*args, **kwargs)

    return bound


def _truncate(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."
