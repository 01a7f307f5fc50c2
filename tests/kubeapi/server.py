"""The HTTP face of the fake cluster: the apiserver's REST paths, auth, watch streams, faults.

Start one per test (``async with FakeKubeApi() as api``) on 127.0.0.1 and a free port, plain
HTTP or TLS (``tls=True``: a trustme CA, whose PEM is at ``api.ca_path``). Every request needs
a bearer token the fake knows (``api.admin_token`` may do anything); ``write_kubeconfig`` and
``write_service_account`` give a client what it needs to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.kubeapi import patch as patches
from tests.kubeapi.auth import User
from tests.kubeapi.cluster import Cluster, Watch
from tests.kubeapi.errors import (
    ApiError,
    bad_request,
    forbidden,
    invalid,
    method_not_allowed,
    server_not_found,
    unauthorized,
    unsupported_media_type,
)
from tests.kubeapi.resources import ResourceType

JSON = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
CRD_FILES = (REPO / "deploy" / "base" / "crd-cachedmodel.yaml",
             REPO / "deploy" / "base" / "crd-nodecache.yaml")
#: verbs whose request body is an object written to storage (counted in ``bytes_in``)
WRITES = ("create", "update", "patch")
_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
    410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
    503: "ServiceUnavailable", 504: "Timeout",
}


def load_crds(paths: Iterable[Path] = CRD_FILES) -> list[JSON]:
    docs: list[JSON] = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


@dataclass
class Request:
    """One request as the fake understood it, and the status it got (for assertions)."""

    method: str
    verb: str
    path: str
    query: dict[str, str]
    resource: str  # plural, with "/subresource" if any
    group: str
    namespace: str
    name: str
    user: str
    content_type: str
    status: int = 0
    #: bytes of the request's body (what a client wrote)
    bytes_in: int = 0
    #: bytes of the reply's body; for a watch, every event sent on its stream so far
    bytes_out: int = 0
    #: events sent on a watch's stream so far (bookmarks included)
    events_out: int = 0
    #: for a list: ``cache`` (the watch cache answered) or ``etcd`` (a consistent read)
    served_from: str = ""


RECORD = web.RequestKey("record", Request)


@dataclass(frozen=True)
class Traffic:
    """What crossed the wire for some requests (see :meth:`FakeKubeApi.traffic`)."""

    requests: int
    writes: int
    #: request bodies of creates, updates and patches
    written: int
    #: events sent on watch streams, and their bytes
    watch_events: int
    watched: int
    #: list replies
    listed: int

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass
class Fault:
    verb: str | None
    resource: str | None
    code: int
    times: int
    message: str
    retry_after: int | None = None
    skip: int = 0

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb in (None, verb)) and (self.resource in (None, resource))


@dataclass
class _Target:
    rt: ResourceType
    namespace: str
    name: str
    subresource: str
    verb: str


class FakeKubeApi:
    """A kube-apiserver stand-in with the semantics clients rely on. See ``Cluster``."""

    def __init__(
        self,
        *,
        crds: Iterable[JSON] | None = None,
        tls: bool = False,
        history: int = 1000,
        bookmark_interval: float = 60.0,
        max_watch_seconds: float = 1800.0,
        enforce_rbac: bool = False,
    ) -> None:
        self.cluster = Cluster(load_crds() if crds is None else crds, history=history)
        self.auth = self.cluster.auth
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        #: when set, every request is checked against the RBAC rules in ``auth`` (403)
        self.enforce_rbac = enforce_rbac
        self.admin_token = "fake-admin-token"
        self.auth.add_token(self.admin_token, "kubernetes-admin", ["system:masters"])
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.url = ""
        self.ca_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FakeKubeApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-kube-")
        ssl_ctx = None
        if self.tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ssl_ctx)
            self.ca_path = Path(self._tmp.name) / "ca.crt"
            ca.cert_pem.write_to_path(str(self.ca_path))
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        port = server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.cluster.break_watches(clean=True)
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- what clients need ---------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        cluster: JSON = {"server": self.url}
        if self.ca_path is not None:
            cluster["certificate-authority"] = str(self.ca_path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake-user", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake-user",
                                                       "namespace": "default"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    def write_service_account(self, directory: Path, token: str, namespace: str) -> dict[str, str]:
        """The files of a pod's service-account mount, and the environment of an in-cluster
        process (needs ``tls=True``: in-cluster clients speak HTTPS only)."""
        assert self.ca_path is not None, "in-cluster configuration needs tls=True"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token)
        (directory / "namespace").write_text(namespace)
        (directory / "ca.crt").write_bytes(self.ca_path.read_bytes())
        port = self.url.rsplit(":", 1)[1]
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}

    # --- test hooks ----------------------------------------------------------------------

    def fail_next(
        self,
        verb: str | None = None,
        resource: str | None = None,
        code: int = 500,
        times: int = 1,
        message: str = "injected failure",
        retry_after: int | None = None,
        skip: int = 0,
    ) -> None:
        """Answer the next ``times`` matching requests with an error Status of ``code``,
        after letting ``skip`` of them through (``resource`` as counted: ``pods``,
        ``cachedmodels/status``; ``verb`` a Kubernetes verb: get, list, watch, create,
        update, patch, delete)."""
        self.faults.append(Fault(verb, resource, code, times, message, retry_after, skip))

    def count(self, verb: str | None = None, resource: str | None = None,
              status: int | None = None) -> int:
        """Requests so far with this verb on this resource (``None``: any), optionally only
        those answered with ``status`` (a watch counts as 200 once its stream has started)."""
        return sum(1 for r in self.requests
                   if verb in (None, r.verb) and resource in (None, r.resource)
                   and status in (None, r.status))

    async def wait_for_watch(self, resource: str, nth: int = 1) -> Request:
        """Wait until the ``nth`` watch request on ``resource`` is open; return it."""
        rt = self.cluster.resource(resource)

        def opened() -> bool:
            seen = [r for r in self.requests if r.verb == "watch" and r.resource == rt.plural
                    and r.group == rt.group]
            return len(seen) >= nth and any(w.rt == rt for w in self.cluster.watches)

        await self.cluster.wait_until(opened)
        return [r for r in self.requests if r.verb == "watch" and r.resource == rt.plural
                and r.group == rt.group][nth - 1]

    def traffic(self, resource: str | None = None, verb: str | None = None) -> Traffic:
        """Bytes clients wrote and the server sent so far, on ``resource`` as counted
        (``nodecaches``, ``cachedmodels/status``; ``None``: every resource)."""
        seen = [r for r in self.requests if resource in (None, r.resource)
                and verb in (None, r.verb)]
        return Traffic(
            requests=len(seen),
            written=sum(r.bytes_in for r in seen if r.verb in WRITES),
            writes=sum(1 for r in seen if r.verb in WRITES),
            watched=sum(r.bytes_out for r in seen if r.verb == "watch"),
            watch_events=sum(r.events_out for r in seen if r.verb == "watch"),
            listed=sum(r.bytes_out for r in seen if r.verb == "list"),
        )

    @property
    def by_path(self) -> Counter[tuple[str, str]]:
        """Requests per (verb, path)."""
        return Counter((r.verb, r.path) for r in self.requests)

    # --- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            resp = await self._serve(request)
        except ApiError as e:
            resp = _status_response(e)
        record = request.get(RECORD)
        if record is not None:
            record.status = resp.status
            if isinstance(resp, web.Response) and resp.body is not None:
                record.bytes_out = len(resp.body)  # type: ignore[arg-type]
        return resp

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        user = self.auth.authenticate(request.headers.get("Authorization"))
        if path == "/version":
            return web.json_response({"major": "1", "minor": "37", "gitVersion": "v1.37.0-fake",
                                      "platform": "linux/amd64"})
        discovery = self._discovery(path)
        if discovery is not None:
            if user is None:
                raise unauthorized()
            return web.json_response(discovery)
        target = self._route(request)
        resource = target.rt.plural + (f"/{target.subresource}" if target.subresource else "")
        record = Request(
            request.method, target.verb, path, dict(request.query), resource, target.rt.group,
            target.namespace, target.name, user.name if user else "",
            request.headers.get("Content-Type", ""),
        )
        request[RECORD] = record
        self.requests.append(record)
        if user is None:
            raise unauthorized()
        if self.enforce_rbac:
            self._authorize(user, target)
        self._inject_fault(target.verb, resource)
        return await self._dispatch(request, target, user)

    def _route(self, request: web.Request) -> _Target:
        parts = [p for p in request.path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise server_not_found()
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise server_not_found()
        rt = self.cluster.lookup(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if (namespace and not rt.namespaced) or (sub and sub not in rt.subresources):
            raise server_not_found()
        if rt.namespaced and name and not namespace:
            raise server_not_found()
        method = request.method
        if method == "GET":
            watching = request.query.get("watch", "") in ("1", "true", "True")
            verb = "get" if name else ("watch" if watching else "list")
        elif method == "POST" and not name:
            verb = "create"
        elif method == "PUT" and name:
            verb = "update"
        elif method == "PATCH" and name:
            verb = "patch"
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            raise method_not_allowed(method)
        if rt.virtual and verb != "create":
            raise method_not_allowed(method)
        return _Target(rt, namespace, name, sub, verb)

    def _authorize(self, user: User, t: _Target) -> None:
        attrs = {"resourceAttributes": {
            "namespace": t.namespace, "verb": t.verb, "group": t.rt.group,
            "version": t.rt.version, "resource": t.rt.plural, "subresource": t.subresource,
            "name": t.name,
        }}
        if not self.auth.authorized(user.name, user.groups, attrs):
            raise forbidden(user.name, t.verb, t.rt.group, t.rt.plural, t.namespace, t.name,
                            t.subresource)

    def _inject_fault(self, verb: str, resource: str) -> None:
        for fault in self.faults:
            if fault.times > 0 and fault.matches(verb, resource):
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.times -= 1
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else None
                raise ApiError(fault.code, _REASONS.get(fault.code, "InternalError"),
                               fault.message, headers=headers)

    async def _dispatch(self, request: web.Request, t: _Target, user: User) -> web.StreamResponse:
        c, q = self.cluster, request.query
        dry_run = q.get("dryRun") == "All"
        if t.rt.virtual:
            return _json(self._review(t.rt, await _body(request)), 201)
        if t.verb == "get":
            return _json(c.get(t.rt, t.name, t.namespace))
        if t.verb == "list":
            limit = _int(q.get("limit"), "limit")
            cached = from_watch_cache(q.get("resourceVersion"), limit, q.get("continue"),
                                      q.get("resourceVersionMatch"))
            request[RECORD].served_from = "cache" if cached else "etcd"
            return _json(c.list(
                t.rt, t.namespace, q.get("labelSelector"), q.get("fieldSelector"),
                limit=0 if cached else limit, continue_=q.get("continue") or None,
                resource_version=q.get("resourceVersion"),
                resource_version_match=q.get("resourceVersionMatch"),
            ))
        if t.verb == "watch":
            return await self._watch(request, t, user)
        if t.verb == "create":
            return _json(c.create(t.rt, await _body(request), t.namespace, dry_run), 201)
        if t.verb == "update":
            return _json(c.update(t.rt, t.name, await _body(request), t.namespace,
                                  t.subresource, dry_run))
        if t.verb == "patch":
            ctype = request.content_type
            if ctype not in (patches.MERGE, patches.JSON_PATCH, patches.STRATEGIC, patches.APPLY):
                raise unsupported_media_type(patches.accepted(t.rt.builtin))
            return _json(c.patch(t.rt, t.name, await _body(request), t.namespace, ctype,
                                 t.subresource, dry_run))
        if t.verb == "delete":
            options = await _body(request) if request.can_read_body else {}
            if "gracePeriodSeconds" in q:
                options["gracePeriodSeconds"] = _int(q["gracePeriodSeconds"], "gracePeriodSeconds")
            if "propagationPolicy" in q:
                options["propagationPolicy"] = q["propagationPolicy"]
            return _json(c.delete(t.rt, t.name, t.namespace, options, dry_run))
        if t.verb == "deletecollection":
            options = await _body(request) if request.can_read_body else {}
            return _json(c.delete_collection(t.rt, t.namespace, q.get("labelSelector"),
                                             q.get("fieldSelector"), options, dry_run))
        raise method_not_allowed(request.method)

    def _review(self, rt: ResourceType, body: JSON) -> JSON:
        if body.get("kind") not in (None, rt.kind):
            raise bad_request(f"the body of the request was of kind {body.get('kind')}, "
                              f"expected {rt.kind}")
        spec: JSON = body.get("spec") or {}
        review = {"kind": rt.kind, "apiVersion": rt.api_version,
                  "metadata": {"creationTimestamp": None}, "spec": spec}
        if rt.plural == "tokenreviews":
            if not spec.get("token"):
                raise bad_request("token is required for TokenReview in authentication")
            return self.auth.token_review(review)
        causes = []
        if ("resourceAttributes" in spec) == ("nonResourceAttributes" in spec):
            causes.append(("spec.resourceAttributes", "FieldValueInvalid",
                           "Invalid value: exactly one of nonResourceAttributes or "
                           "resourceAttributes must be specified"))
        if not spec.get("user") and not spec.get("groups"):
            causes.append(("spec.user", "FieldValueInvalid",
                           'Invalid value: "": at least one of user or group must be specified'))
        if causes:
            raise invalid(rt.group, rt.kind, "", causes)
        return self.auth.subject_access_review(review)

    async def _watch(self, request: web.Request, t: _Target, user: User) -> web.StreamResponse:
        q = request.query
        timeout = min(float(_int(q.get("timeoutSeconds"), "timeoutSeconds") or
                            self.max_watch_seconds), self.max_watch_seconds)
        bookmarks = q.get("allowWatchBookmarks", "") in ("1", "true", "True")
        initial = q.get("sendInitialEvents", "") in ("1", "true", "True")
        w = self.cluster.watch(
            t.rt, t.namespace, q.get("labelSelector"), q.get("fieldSelector"),
            q.get("resourceVersion"), bookmarks, initial, user.name,
        )
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            return await self._stream(request, w, timeout)
        finally:
            self._streams.discard(task)
            self.cluster.unwatch(w)

    async def _stream(self, request: web.Request, w: Watch, timeout: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.get(RECORD) is not None:
            request[RECORD].status = resp.status
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval

        record = request.get(RECORD)

        async def send(event: JSON) -> None:
            line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
            if record is not None:
                record.bytes_out += len(line)
                record.events_out += 1
            await resp.write(line)

        while True:
            wake = min(deadline, next_bookmark) if w.bookmarks else deadline
            try:
                async with asyncio.timeout_at(wake):
                    kind, payload = await w.queue.get()
            except TimeoutError:
                if loop.time() >= deadline:
                    if w.bookmarks:
                        await send(self.cluster.bookmark(w))
                    break
                await send(self.cluster.bookmark(w))
                next_bookmark = loop.time() + self.bookmark_interval
                continue
            if kind == "event":
                await send(payload)
            elif kind == "bookmark":
                if w.bookmarks:
                    await send(self.cluster.bookmark(w, payload))
            elif kind == "end":
                break
            elif kind == "break":
                # drop the connection mid-stream: no terminating chunk, as a crashed apiserver
                # or a reset load balancer would
                if request.transport is not None:
                    request.transport.abort()
                return resp
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    def _discovery(self, path: str) -> JSON | None:
        path = path.rstrip("/")
        types = self.cluster.types
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": self.url.split("://", 1)[1]}]}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for rt in types:
                if rt.group and rt.version not in groups.setdefault(rt.group, []):
                    groups[rt.group].append(rt.version)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()]}
        for rt in types:
            prefix = f"/apis/{rt.group}/{rt.version}" if rt.group else f"/api/{rt.version}"
            if path == prefix:
                same = [x for x in types if (x.group, x.version) == (rt.group, rt.version)]
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": rt.api_version, "resources": _resource_list(same)}
        return None


def _resource_list(types: list[ResourceType]) -> list[JSON]:
    out: list[JSON] = []
    for rt in types:
        verbs = ["create"] if rt.virtual else [
            "create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        out.append({"name": rt.plural, "singularName": rt.kind.lower(),
                    "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs})
        for sub in sorted(rt.subresources):
            out.append({"name": f"{rt.plural}/{sub}", "singularName": "",
                        "namespaced": rt.namespaced, "kind": rt.kind,
                        "verbs": ["get", "patch", "update"]})
    return out


def _json(body: JSON, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status,
                        content_type="application/json")


def _status_response(e: ApiError) -> web.Response:
    resp = _json(e.status(), e.code)
    for k, v in e.headers.items():
        resp.headers[k] = v
    return resp


def from_watch_cache(resource_version: str | None, limit: int, continue_: str | None,
                     match: str | None) -> bool:
    """Whether kube-apiserver answers a list from its watch cache rather than from etcd
    (the cacher's ``shouldDelegateList``, without the consistent-list-from-cache of 1.31+):
    any resourceVersion but none, no continue token, no limit unless the resourceVersion is
    ``0`` (the cache then ignores ``limit`` and answers with the whole list), and no
    ``Exact`` match."""
    if resource_version in (None, "") or continue_:
        return False
    if limit and resource_version != "0":
        return False
    return match in (None, "", "NotOlderThan")


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    record = request.get(RECORD)
    if record is not None:
        record.bytes_in = len(raw)
    try:
        return json.loads(raw) if raw else {}
    except ValueError as e:
        raise bad_request(f"couldn't get version/kind; json parse error: {e}") from e


def _int(value: str | None, what: str) -> int:
    if value in (None, ""):
        return 0
    try:
        return int(value)
    except ValueError as e:
        raise bad_request(f"invalid {what}: {value!r}") from e
