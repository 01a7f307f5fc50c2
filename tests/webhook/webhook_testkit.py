"""Helpers shared by the webhook tests: reviews as kube-apiserver sends them, schema and Pod
Security checks of mutated pods, the real webhook app served in process over TLS, and a
small fake of the API server's namespace and webhook-configuration endpoints (list, watch
with bookmarks and 410 Gone, get, JSON patch).

(A module of its own name, not ``conftest``: test modules import it directly.)
"""

from __future__ import annotations

import asyncio
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
from aiohttp import web
from kubernetes_validate import utils
from referencing import Registry, Resource

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


@dataclass
class RunningApi:
    fake: FakeApiServer
    url: str


# --- a fake API server ----------------------------------------------------------------------


class FakeApiServer:
    """Namespaces (list with pagination, watch with bookmarks, 410 for compacted versions)
    and MutatingWebhookConfigurations (get, JSON patch with ``test``), behind a bearer token.

    Faithful where the webhook relies on it: every write bumps a global resourceVersion;
    a watch from a version older than the compaction point gets 410 (as an HTTP status on
    ``gone_as_status``, else as an ERROR event in a 200 stream, as kube-apiserver does);
    bookmarks carry only ``metadata.resourceVersion``.
    """

    def __init__(self, token: str = "test-token") -> None:  # noqa: S107 - a test token
        self.token = token
        self.rv = 100
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        self.gone_as_status = False
        self.webhook_configs: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.watches = 0
        self._cond = asyncio.Condition()
        self._kick: list[asyncio.Queue[str]] = []

    # state changes (tests call these)

    async def put_namespace(self, name: str, labels: dict[str, str]) -> None:
        kind = "MODIFIED" if name in self.namespaces else "ADDED"
        self.rv += 1
        obj = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": dict(labels),
                            "resourceVersion": str(self.rv)}}
        self.namespaces[name] = obj
        await self._record(kind, obj)

    async def delete_namespace(self, name: str) -> None:
        obj = self.namespaces.pop(name)
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        await self._record("DELETED", obj)

    async def _record(self, kind: str, obj: dict[str, Any]) -> None:
        async with self._cond:
            self.events.append((self.rv, kind, copy.deepcopy(obj)))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget history up to the current version: a watch from an older one gets 410."""
        self.compacted = self.rv
        self.events.clear()

    async def expire_watches(self) -> None:
        """Send a 410 ERROR event on every open watch (etcd compaction under a watcher)."""
        for queue in self._kick:
            queue.put_nowait("gone")

    async def drop_watches(self) -> None:
        """Cut every open watch without a word (a load balancer resetting idle streams)."""
        for queue in self._kick:
            queue.put_nowait("drop")

    async def bookmark(self) -> None:
        for queue in self._kick:
            queue.put_nowait("bookmark")

    # HTTP

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/v1/namespaces", self._namespaces)
        path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        app.router.add_get(path, self._get_config)
        app.router.add_patch(path, self._patch_config)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _namespaces(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request)
        names = sorted(self.namespaces)
        limit = int(request.query.get("limit") or 0) or len(names) or 1
        start = int(request.query.get("continue") or 0)
        page = names[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(names):
            meta["continue"] = str(start + limit)
        return web.json_response({
            "kind": "NamespaceList", "apiVersion": "v1", "metadata": meta,
            "items": [self.namespaces[n] for n in page],
        })

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        timeout = float(request.query.get("timeoutSeconds") or 300)
        if since < self.compacted and self.gone_as_status:
            return _status(410, "Expired", f"too old resource version: {since}")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        async with self._cond:
            self.watches += 1
            self._cond.notify_all()
        if since < self.compacted:
            await _send(response, _gone(since))
            return response
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._kick.append(queue)
        sent = since
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for rv, kind, obj in list(self.events):
                        if rv > sent:
                            await _send(response, {"type": kind, "object": obj})
                            sent = rv
                    wait_events = asyncio.ensure_future(self._wait_after(sent))
                    wait_kick = asyncio.ensure_future(queue.get())
                    done, pending = await asyncio.wait(
                        {wait_events, wait_kick}, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    if wait_kick in done:
                        kick = wait_kick.result()
                        if kick == "gone":
                            await _send(response, _gone(sent))
                            return response
                        if kick == "drop":
                            if request.transport is not None:
                                request.transport.close()
                            return response
                        if kick == "bookmark" and bookmarks:
                            await _send(response, {"type": "BOOKMARK", "object": {
                                "kind": "Namespace", "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(self.rv)}}})
                            sent = max(sent, self.rv)
        except TimeoutError:
            pass
        finally:
            self._kick.remove(queue)
        return response

    async def wait_watches(self, count: int) -> None:
        """Return once ``count`` watch streams have been opened in all."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.watches >= count)

    async def _wait_after(self, rv: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: any(e[0] > rv for e in self.events))

    async def _get_config(self, request: web.Request) -> web.Response:
        config = self.webhook_configs.get(request.match_info["name"])
        if config is None:
            return _status(404, "NotFound", "not found")
        return web.json_response(config)

    async def _patch_config(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.content_type != "application/json-patch+json":
            return _status(415, "UnsupportedMediaType", request.content_type)
        if name not in self.webhook_configs:
            return _status(404, "NotFound", "not found")
        try:
            patched = jsonpatch.apply_patch(self.webhook_configs[name], await request.json())
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            return _status(422, "Invalid", str(e))
        self.rv += 1
        patched["metadata"]["resourceVersion"] = str(self.rv)
        self.webhook_configs[name] = patched
        return web.json_response(patched)


def _gone(rv: int) -> dict[str, Any]:
    return {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {rv}", "reason": "Expired", "code": 410}}


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Failure", "message": message, "reason": reason,
                              "code": code}, status=code)
