"""The agent's one client of the Kubernetes API (the only module importing kubernetes_asyncio).

What the agent needs from a cluster, as plain JSON objects (``dict``s shaped as the apiserver
sends them, never client model classes):

- informers (``watch_cached_models``, ``watch_pods_on_node``, ``watch_node``): list, then
  watch from the list's resourceVersion with bookmarks; reconnect from the last
  resourceVersion seen after a dropped or timed-out stream (jittered backoff); on
  ``410 Expired`` list again and report the difference, including deletions that happened
  while disconnected, so no change is ever lost. Each keeps a local ``store``.
- writes that never conflict with other writers: node labels by merge patch on the agent's
  own ``modelcache.io/m-*`` keys; a CachedModel's ``status.nodes.<node>`` by merge patch on
  the status subresource. The summary counts (``status.ready/pulling/failed``) are derived
  from ``status.nodes``: after writing its entry an agent recomputes them from the object it
  got back and patches them guarded by that object's resourceVersion, re-reading on 409. A
  guarded patch only succeeds on the current object, so the last write always leaves counts
  that match the entries.
- Events (events.k8s.io/v1, best effort), TokenReview, SubjectAccessReview, Secrets (decoded,
  never logged).

Errors are translated here: 404 -> ``NotFound``, 409 -> ``Conflict``, 429/5xx/unreachable ->
``TransientError``, any other refusal (RBAC, validation) -> ``KubeError``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import OpenApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from agent.settings import KubeSettings
from common.errors import (
    Conflict,
    InvalidInput,
    KubeError,
    ModelcacheError,
    NotFound,
    TransientError,
)
from common.reference import LABEL_PREFIX

log = logging.getLogger(__name__)

GROUP = "modelcache.io"
VERSION = "v1alpha1"
PLURAL = "cachedmodels"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
#: the fields of a ``status.nodes.<node>`` entry (see the CRD)
NODE_ENTRY_FIELDS = ("state", "revision", "bytes", "lastTransitionTime", "message", "verified")
COUNTED_STATES = ("ready", "pulling", "failed")
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NOTE_BYTES = 1024

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class Expired(TransientError):
    """``410 Gone``: the resourceVersion asked for is older than the server keeps."""

    reason = "expired"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: Obj
    #: derived from a list (first sync or relist after 410) rather than a watch event
    synthetic: bool = False


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
    try:
        if kubeconfig:
            await k8s_config.load_kube_config(
                config_file=kubeconfig, client_configuration=cfg, persist_config=False
            )
        else:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg,
                token_filename=str(service_account_dir / "token"),
                cert_filename=str(service_account_dir / "ca.crt"),
                environ=dict(environ if environ is not None else os.environ),
            )
    except (ConfigException, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        where = kubeconfig or "in-cluster service account"
        raise InvalidInput(f"cannot configure the Kubernetes client from {where}: {e}") from e
    return KubeClient(k8s.ApiClient(cfg), settings, instance or socket.gethostname())


class KubeClient:
    """A typed facade over the few API calls the agent makes."""

    def __init__(self, api: k8s.ApiClient, settings: KubeSettings, instance: str) -> None:
        self._api = api
        self.settings = settings
        self.instance = instance
        self._core = k8s.CoreV1Api(api)
        self._custom = k8s.CustomObjectsApi(api)
        self._events = k8s.EventsV1Api(api)
        self._authn = k8s.AuthenticationV1Api(api)
        self._authz = k8s.AuthorizationV1Api(api)

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

    def watch_pods_on_node(self, node: str, label_selector: str | None = None) -> Informer:
        """Pods bound to ``node`` in every namespace (field selector ``spec.nodeName``)."""
        return Informer(self, "pods", self._core.list_pod_for_all_namespaces,
                        field_selector=f"spec.nodeName={node}", label_selector=label_selector)

    def watch_node(self, node: str) -> Informer:
        """The agent's own Node (its labels decide which CachedModels select it)."""
        return Informer(self, "nodes", self._core.list_node,
                        field_selector=f"metadata.name={node}")

    # --- reads ---------------------------------------------------------------------------

    async def get_node(self, name: str) -> Obj:
        return await self._json(f"get node {name}", self._core.read_node, name)

    async def get_cached_model(self, namespace: str, name: str) -> Obj:
        return await self._json(
            f"get cachedmodel {namespace}/{name}", self._custom.get_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURAL, name,
        )

    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, decoded to text. The values are never logged nor put in errors."""
        what = f"read secret {namespace}/{name}"
        obj = await self._json(what, self._core.read_namespaced_secret, name, namespace)
        out: dict[str, str] = {}
        for key, value in (obj.get("data") or {}).items():
            try:
                out[key] = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                # ``from None``: the decoding error would quote bytes of the secret
                raise InvalidInput(f"{what}: key {key!r} is not base64 UTF-8 text") from None
        return out

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        """A ConfigMap's ``data`` (a signature policy; ``binaryData`` is not read)."""
        obj = await self._json(f"read configmap {namespace}/{name}",
                               self._core.read_namespaced_config_map, name, namespace)
        return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

    # --- writes --------------------------------------------------------------------------

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
        await self._json(
            f"patch labels of node {node}", self._core.patch_node, node,
            {"metadata": {"labels": labels}}, _content_type=MERGE_PATCH,
        )

    async def patch_cached_model_status(
        self, namespace: str, name: str, node: str, entry: Mapping[str, Any] | None
    ) -> Obj:
        """Make ``status.nodes.<node>`` exactly ``entry`` (``None``: remove it), then bring
        the summary counts in line with ``status.nodes``. Returns the object last seen.

        ``entry`` holds ``NODE_ENTRY_FIELDS`` (``state`` required; the caller sets
        ``lastTransitionTime`` when the state changes). Fields left out are cleared.
        """
        if entry is not None:
            unknown = set(entry) - set(NODE_ENTRY_FIELDS)
            if unknown or not entry.get("state"):
                raise InvalidInput(f"invalid status entry for node {node}: fields "
                                   f"{sorted(entry)}; needs 'state', allows {NODE_ENTRY_FIELDS}")
            body: Obj | None = {k: entry.get(k) for k in NODE_ENTRY_FIELDS}
        else:
            body = None
        obj = await self._patch_status(namespace, name, {"status": {"nodes": {node: body}}})
        return await self._reconcile_counts(namespace, name, obj)

    async def _reconcile_counts(self, namespace: str, name: str, obj: Obj) -> Obj:
        for attempt in range(self.settings.status_retries):
            counts = summary_counts(obj)
            status = obj.get("status") or {}
            if all(status.get(k) == v for k, v in counts.items()):
                return obj
            guarded = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                       "status": counts}
            try:
                return await self._patch_status(namespace, name, guarded)
            except Conflict:
                # another agent wrote since: look again (it may have fixed the counts already)
                await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
                obj = await self.get_cached_model(namespace, name)
        log.warning("summary counts of cachedmodel %s/%s left to the next writer after %d "
                    "conflicts", namespace, name, self.settings.status_retries)
        return obj

    async def _patch_status(self, namespace: str, name: str, body: Obj) -> Obj:
        return await self._json(
            f"patch status of cachedmodel {namespace}/{name}",
            self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH,
        )

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
            await self._json(f"create event {reason} about {regarding['name']}",
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
        out = await self._json("create tokenreview", self._authn.create_token_review, body)
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
        out = await self._json("create subjectaccessreview",
                               self._authz.create_subject_access_review, body)
        status = out.get("status") or {}
        return bool(status.get("allowed")) and not status.get("denied")

    # --- transport -----------------------------------------------------------------------

    async def _json(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                    **kwargs: Any) -> Obj:
        resp = await self._open(what, call, *args, **kwargs)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransientError(f"{what}: reading the reply failed: {_name(e)}") from e
        finally:
            resp.release()
        try:
            out = json.loads(raw)
        except ValueError as e:
            raise TransientError(f"{what}: the reply is not JSON") from e
        if not isinstance(out, dict):
            raise TransientError(f"{what}: the reply is not a JSON object")
        return out

    async def _open(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                    **kwargs: Any) -> aiohttp.ClientResponse:
        """Send a request; a reply other than 2xx becomes one of our errors."""
        kwargs.setdefault("_request_timeout", self.settings.request_timeout)
        try:
            resp = await call(*args, _preload_content=False, **kwargs)
        except OpenApiException as e:
            raise KubeError(f"{what}: {e}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise TransientError(f"{what}: Kubernetes API unreachable: {_name(e)}") from e
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


def api_error(what: str, status: int, body: bytes, retry_after: str | None = None
              ) -> ModelcacheError:
    """The error for an apiserver reply with this status and ``Status`` body."""
    reason, message = "", ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason", "")), str(doc.get("message", ""))
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    text = f"{what}: {status} {reason}: {message}".rstrip(": ")
    if status == 404:
        return NotFound(text)
    if status == 409:
        return Conflict(text)
    if status == 410:
        return Expired(text)
    if status == 429 or status >= 500:
        delay: float | None = None
        with contextlib.suppress(TypeError, ValueError):
            delay = float(retry_after) if retry_after else None
        return TransientError(text, retry_after=delay)
    return KubeError(text)


def summary_counts(obj: Obj) -> dict[str, int]:
    """``status.ready/pulling/failed`` as ``status.nodes`` implies them."""
    nodes = ((obj.get("status") or {}).get("nodes") or {}).values()
    states = [n.get("state") for n in nodes if isinstance(n, dict)]
    return {s: states.count(s) for s in COUNTED_STATES}


def object_key(obj: Obj) -> str:
    """``namespace/name`` (or ``name`` for a cluster-scoped object): the key of a store."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


# --- informers -------------------------------------------------------------------------------


class Informer:
    """A list-then-watch view of one kind of object that loses no change.

    Iterate ``events()`` (or ``run(handler)``) to drive it: it lists, reports every object as
    ADDED, then watches from the list's resourceVersion. A stream that ends or breaks is
    resumed from the last resourceVersion seen (events and bookmarks move it); one refused
    with ``410 Expired`` is replaced by a new list whose difference from ``store`` is
    reported (ADDED, MODIFIED, and DELETED for objects that vanished meanwhile, with their
    last known state). ``store`` always holds the objects as of the last event yielded.
    Failures are retried forever with jittered exponential backoff.
    """

    def __init__(
        self,
        client: KubeClient,
        resource: str,
        lister: Callable[..., Awaitable[Any]],
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> None:
        self._client = client
        self.resource = resource
        self._lister = lister
        self._selectors = {k: v for k, v in (("field_selector", field_selector),
                                             ("label_selector", label_selector)) if v}
        self.store: dict[str, Obj] = {}
        self.resource_version = ""
        #: set once the first list has been reported
        self.synced = asyncio.Event()
        #: lists done (the first one, then one per 410 or failed list)
        self.lists = 0
        #: watch requests made
        self.watches = 0
        self.last_error: ModelcacheError | None = None

    def get(self, name: str, namespace: str = "") -> Obj | None:
        return self.store.get(f"{namespace}/{name}" if namespace else name)

    async def run(self, handler: Callable[[WatchEvent], Awaitable[None]]) -> None:
        """Call ``handler`` for each event, until cancelled."""
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                await handler(event)

    async def events(self) -> AsyncGenerator[WatchEvent, None]:
        """Every change, forever (use with ``contextlib.aclosing``)."""
        settings = self._client.settings
        backoff = _Backoff(settings.backoff_base, settings.backoff_max)
        must_list = True
        loop = asyncio.get_running_loop()
        while True:
            try:
                if must_list:
                    for event in await self._list():
                        self._apply(event)
                        yield event
                    must_list = False
                    self.synced.set()
                started, seen = loop.time(), 0
                async with contextlib.aclosing(self._watch()) as stream:
                    async for event in stream:
                        seen += 1
                        backoff.reset()
                        self._apply(event)
                        yield event
                if not seen and loop.time() - started < 1.0:
                    await backoff.wait()  # a watch that ends at once: do not spin
            except Expired as e:
                log.info("%s: %s; listing again", self.resource, e)
                must_list = True
            except ModelcacheError as e:
                self.last_error = e
                log.warning("%s: %s; retrying", self.resource, e)
                await backoff.wait()

    async def _list(self) -> list[WatchEvent]:
        """List all pages at one resourceVersion; the difference from ``store`` as events."""
        settings = self._client.settings
        self.lists += 1
        items: dict[str, Obj] = {}
        token: str | None = None
        while True:
            page_args: Obj = {"limit": settings.list_page_size, **self._selectors}
            if token:
                page_args["_continue"] = token
            page = await self._client._json(f"list {self.resource}", self._lister, **page_args)
            kind = str(page.get("kind", "")).removesuffix("List")
            for item in page.get("items") or []:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", page.get("apiVersion", ""))
                items[object_key(item)] = item
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        events = []
        for key, obj in items.items():
            old = self.store.get(key)
            if old is None:
                events.append(WatchEvent("ADDED", obj, synthetic=True))
            elif _rv(old) != _rv(obj):
                events.append(WatchEvent("MODIFIED", obj, synthetic=True))
        for key in self.store.keys() - items.keys():
            events.append(WatchEvent("DELETED", self.store[key], synthetic=True))
        self.resource_version = str(meta.get("resourceVersion", ""))
        return events

    async def _watch(self) -> AsyncGenerator[WatchEvent, None]:
        settings = self._client.settings
        seconds = int(settings.watch_timeout * random.uniform(1.0, 2.0)) or 1
        self.watches += 1
        what = f"watch {self.resource}"
        resp = await self._client._open(
            what, self._lister, watch=True, allow_watch_bookmarks=True,
            resource_version=self.resource_version, timeout_seconds=seconds,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=settings.request_timeout, sock_read=seconds + 30
            ),
            **self._selectors,
        )
        finished = False
        try:
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    raise TransientError(f"{what}: stream broken: {_name(e)}") from e
                if not line:
                    finished = True
                    return
                event = _decode_event(what, line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    raise api_error(what, int(obj.get("code") or 500), line)
                if kind == "BOOKMARK":
                    self.resource_version = _rv(obj) or self.resource_version
                    continue
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    raise TransientError(f"{what}: unknown event type {kind!r}")
                self.resource_version = _rv(obj) or self.resource_version
                yield WatchEvent(kind, obj)
        finally:
            if finished:
                resp.release()
            else:
                resp.close()

    def _apply(self, event: WatchEvent) -> None:
        key = object_key(event.object)
        if event.type == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = event.object


def _decode_event(what: str, line: bytes) -> Obj:
    try:
        event = json.loads(line)
    except ValueError as e:
        raise TransientError(f"{what}: a watch event is not JSON") from e
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise TransientError(f"{what}: a watch event has no object")
    return event


class _Backoff:
    """Exponential delays with jitter (half fixed, half random)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def reset(self) -> None:
        self.failures = 0

    async def wait(self) -> None:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))


def _bind(call: Callable[..., Awaitable[Any]], *args: Any) -> Callable[..., Awaitable[Any]]:
    async def bound(**kwargs: Any) -> Any:
        return await call(*args, **kwargs)

    return bound


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def _name(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _truncate(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."
