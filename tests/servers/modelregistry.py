"""A Kubeflow Model Registry-compatible REST server (registered models, versions, artifacts).

Follows the Model Registry OpenAPI (``api/openapi/model-registry.yaml`` upstream), served
under both ``/api/model_registry/v1alpha3`` (the spec's version) and ``/api/model_registry/v1``
(what the current PyPI ``model-registry`` client calls); the faithfulness test registers and
reads back models with that real client. Implemented:

- ``registered_models`` (GET list, POST), ``registered_models/{id}`` (GET, PATCH),
  ``registered_models/{id}/versions`` (GET, POST), ``registered_model?name=|externalId=``;
- ``model_versions`` (GET, POST), ``model_versions/{id}`` (GET, PATCH),
  ``model_versions/{id}/artifacts`` (GET, POST = upsert and associate),
  ``model_version?name=&parentResourceId=|externalId=``;
- ``model_artifacts`` (GET, POST), ``model_artifacts/{id}`` (GET, PATCH),
  ``model_artifact?name=&parentResourceId=|externalId=``;
- ``artifacts`` (GET, POST), ``artifacts/{id}`` (GET, PATCH), ``artifact?...``.

Lists take ``pageSize``, ``orderBy`` (``ID``, ``CREATE_TIME``, ``LAST_UPDATE_TIME``,
``NAME``), ``sortOrder`` and ``nextPageToken``, and answer ``{items, size, pageSize,
nextPageToken}`` with an empty token on the last page, as the real server does. Ids are
decimal strings, times are epoch milliseconds as strings, errors are ``{code, message}``.
With ``token`` set every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.servers.aioserver import AppThread
from tests.servers.net import LOOPBACK

PREFIXES = ("/api/model_registry/v1alpha3", "/api/model_registry/v1")
ARTIFACT_TYPES = ("model-artifact", "doc-artifact", "dataset-artifact", "metric", "parameter")
RM_STATES = ("LIVE", "ARCHIVED")
ARTIFACT_STATES = (
    "UNKNOWN", "PENDING", "LIVE", "MARKED_FOR_DELETION", "DELETED", "ABANDONED", "REFERENCE",
)  # fmt: skip
_IMMUTABLE = {"id", "createTimeSinceEpoch", "lastUpdateTimeSinceEpoch", "registeredModelId"}
_FILTER = re.compile(r"""^\s*(\w+)\s*=\s*(?:"([^"]*)"|'([^']*)')\s*$""")

Entity = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Logged:
    method: str
    path: str
    query: Mapping[str, str]
    authorization: str | None
    status: int = 0


class ModelRegistryServer:
    """In-memory registry state and its handlers; thread-safe."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.base_url = ""
        self._lock = threading.Lock()
        self._models: dict[str, Entity] = {}
        self._versions: dict[str, Entity] = {}
        self._artifacts: dict[str, Entity] = {}
        self._artifact_parent: dict[str, str] = {}
        self._context_ids = itertools.count(1)  # registered models and versions share ids
        self._artifact_ids = itertools.count(1)
        self._log: list[Logged] = []

    @property
    def host_port(self) -> str:
        """``127.0.0.1:<port>``: the host part of a ``model-registry://`` reference."""
        return self.base_url.split("://", 1)[1]

    def log(self) -> list[Logged]:
        with self._lock:
            return list(self._log)

    # -- direct set-up, without the HTTP client -----------------------------------------
    def register(self, name: str, version: str, uri: str, **artifact: Any) -> tuple[str, str, str]:
        """Create (or reuse) the registered model, add the version and its model artifact
        named after the model; returns ``(model_id, version_id, artifact_id)``."""
        with self._lock:
            rm = next((m for m in self._models.values() if m["name"] == name), None)
            if rm is None:
                rm = self._create_model({"name": name})
            mv = self._create_version({"name": version, "registeredModelId": rm["id"]})
            ma = self._create_artifact(
                {"name": name, "uri": uri, "artifactType": "model-artifact", **artifact},
                parent=mv["id"],
            )
        return rm["id"], mv["id"], ma["id"]

    def add_artifact(self, version_id: str, **artifact: Any) -> str:
        """Add an artifact (a model artifact unless ``artifactType`` says otherwise) to a
        version; returns its id."""
        with self._lock:
            return str(self._create_artifact(artifact, parent=version_id)["id"])

    # -- entity creation (caller holds the lock) ----------------------------------------
    def _stamp(self, entity: Entity, new_id: str) -> Entity:
        now = str(int(time.time() * 1000))
        entity.update(id=new_id, createTimeSinceEpoch=now, lastUpdateTimeSinceEpoch=now)
        entity.setdefault("customProperties", {})
        return entity

    def _create_model(self, body: Entity) -> Entity:
        _require(body, "name")
        if any(m["name"] == body["name"] for m in self._models.values()):
            raise ApiError(409, f"registered model {body['name']!r} already exists")
        _check_enum(body, "state", RM_STATES)
        entity = self._stamp({**body, "state": body.get("state", "LIVE")}, self._next_context())
        self._models[entity["id"]] = entity
        return entity

    def _create_version(self, body: Entity) -> Entity:
        _require(body, "name", "registeredModelId")
        parent = str(body["registeredModelId"])
        if parent not in self._models:
            raise ApiError(404, f"registered model {parent} not found")
        for v in self._versions.values():
            if v["registeredModelId"] == parent and v["name"] == body["name"]:
                raise ApiError(409, f"version {body['name']!r} already exists")
        _check_enum(body, "state", RM_STATES)
        entity = self._stamp(
            {**body, "registeredModelId": parent, "state": body.get("state", "LIVE")},
            self._next_context(),
        )
        self._versions[entity["id"]] = entity
        return entity

    def _create_artifact(self, body: Entity, parent: str | None = None) -> Entity:
        kind = body.get("artifactType", "model-artifact")
        if kind not in ARTIFACT_TYPES:
            raise ApiError(400, f"unknown artifactType {kind!r}")
        _check_enum(body, "state", ARTIFACT_STATES)
        if parent is not None and parent not in self._versions:
            raise ApiError(404, f"model version {parent} not found")
        name = body.get("name")
        if name is not None:
            for aid, a in self._artifacts.items():
                if a.get("name") == name and self._artifact_parent.get(aid) == parent:
                    raise ApiError(409, f"artifact {name!r} already exists")
        entity = self._stamp(
            {**body, "artifactType": kind, "state": body.get("state", "UNKNOWN")},
            str(next(self._artifact_ids)),
        )
        self._artifacts[entity["id"]] = entity
        if parent is not None:
            self._artifact_parent[entity["id"]] = parent
        return entity

    def _next_context(self) -> str:
        return str(next(self._context_ids))

    # -- HTTP ---------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
            ("GET", "/registered_models", self.list_models),
            ("POST", "/registered_models", self.create_model),
            ("GET", "/registered_models/{id}", self.get_model),
            ("PATCH", "/registered_models/{id}", self.patch_model),
            ("GET", "/registered_models/{id}/versions", self.list_model_versions),
            ("POST", "/registered_models/{id}/versions", self.create_model_version),
            ("GET", "/registered_model", self.find_model),
            ("GET", "/model_versions", self.list_versions),
            ("POST", "/model_versions", self.create_version),
            ("GET", "/model_versions/{id}", self.get_version),
            ("PATCH", "/model_versions/{id}", self.patch_version),
            ("GET", "/model_versions/{id}/artifacts", self.list_version_artifacts),
            ("POST", "/model_versions/{id}/artifacts", self.upsert_version_artifact),
            ("GET", "/model_version", self.find_version),
            ("GET", "/model_artifacts", self.list_model_artifacts),
            ("POST", "/model_artifacts", self.create_model_artifact),
            ("GET", "/model_artifacts/{id}", self.get_model_artifact),
            ("PATCH", "/model_artifacts/{id}", self.patch_model_artifact),
            ("GET", "/model_artifact", self.find_model_artifact),
            ("GET", "/artifacts", self.list_artifacts),
            ("POST", "/artifacts", self.create_any_artifact),
            ("GET", "/artifacts/{id}", self.get_artifact),
            ("PATCH", "/artifacts/{id}", self.patch_artifact),
            ("GET", "/artifact", self.find_artifact),
        ]
        for prefix in PREFIXES:
            for method, path, handler in routes:
                app.router.add_route(method, prefix + path, handler)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        entry = Logged(
            request.method, request.path, dict(request.query), request.headers.get("Authorization")
        )
        with self._lock:
            self._log.append(entry)
        try:
            if self.token is not None and entry.authorization != f"Bearer {self.token}":
                raise ApiError(401, "missing or invalid bearer token")
            resp: web.StreamResponse = await handler(request)
        except ApiError as e:
            resp = _error(e.status, e.message)
        except web.HTTPException as e:
            resp = _error(e.status, e.reason)
        entry.status = resp.status
        return resp

    # registered models
    async def list_models(self, request: web.Request) -> web.Response:
        with self._lock:
            return _page(request, list(self._models.values()))

    async def create_model(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            return web.json_response(self._create_model(body), status=201)

    async def get_model(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(_get(self._models, request, "registered model"))

    async def patch_model(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            _check_enum(body, "state", RM_STATES)
            return web.json_response(_patch(_get(self._models, request, "registered model"), body))

    async def find_model(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(_find(request, self._models.values(), None))

    async def list_model_versions(self, request: web.Request) -> web.Response:
        with self._lock:
            rm = _get(self._models, request, "registered model")
            items = [v for v in self._versions.values() if v["registeredModelId"] == rm["id"]]
            return _page(request, items)

    async def create_model_version(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            rm = _get(self._models, request, "registered model")
            entity = self._create_version({**body, "registeredModelId": rm["id"]})
            return web.json_response(entity, status=201)

    # model versions
    async def list_versions(self, request: web.Request) -> web.Response:
        with self._lock:
            return _page(request, list(self._versions.values()))

    async def create_version(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            return web.json_response(self._create_version(body), status=201)

    async def get_version(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(_get(self._versions, request, "model version"))

    async def patch_version(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            _check_enum(body, "state", RM_STATES)
            return web.json_response(_patch(_get(self._versions, request, "model version"), body))

    async def find_version(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(
                _find(request, self._versions.values(), lambda v: v["registeredModelId"])
            )

    async def list_version_artifacts(self, request: web.Request) -> web.Response:
        with self._lock:
            mv = _get(self._versions, request, "model version")
            items = [
                a
                for aid, a in self._artifacts.items()
                if self._artifact_parent.get(aid) == mv["id"]
            ]
            return _page(request, _filter_artifacts(request, items))

    async def upsert_version_artifact(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            mv = _get(self._versions, request, "model version")
            if "id" in body:
                existing = self._artifacts.get(str(body["id"]))
                if existing is None:
                    raise ApiError(404, f"artifact {body['id']} not found")
                self._artifact_parent[existing["id"]] = mv["id"]
                return web.json_response(_patch(existing, body), status=200)
            entity = self._create_artifact(body, parent=mv["id"])
            return web.json_response(entity, status=201)

    # artifacts
    def _artifacts_of(self, kind: str | None) -> list[Entity]:
        return [a for a in self._artifacts.values() if kind is None or a["artifactType"] == kind]

    async def list_model_artifacts(self, request: web.Request) -> web.Response:
        with self._lock:
            return _page(request, self._artifacts_of("model-artifact"))

    async def create_model_artifact(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body.get("artifactType", "model-artifact") != "model-artifact":
            raise ApiError(400, "artifactType must be model-artifact")
        with self._lock:
            return web.json_response(self._create_artifact(body), status=201)

    async def get_model_artifact(self, request: web.Request) -> web.Response:
        with self._lock:
            a = _get(self._artifacts, request, "model artifact")
            if a["artifactType"] != "model-artifact":
                raise ApiError(404, "model artifact not found")
            return web.json_response(a)

    async def patch_model_artifact(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            _check_enum(body, "state", ARTIFACT_STATES)
            a = _get(self._artifacts, request, "model artifact")
            return web.json_response(_patch(a, body))

    async def find_model_artifact(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(
                _find(request, self._artifacts_of("model-artifact"), self._parent_of)
            )

    async def list_artifacts(self, request: web.Request) -> web.Response:
        with self._lock:
            return _page(request, _filter_artifacts(request, self._artifacts_of(None)))

    async def create_any_artifact(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _require(body, "artifactType")
        with self._lock:
            return web.json_response(self._create_artifact(body), status=201)

    async def get_artifact(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(_get(self._artifacts, request, "artifact"))

    async def patch_artifact(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._lock:
            _check_enum(body, "state", ARTIFACT_STATES)
            return web.json_response(_patch(_get(self._artifacts, request, "artifact"), body))

    async def find_artifact(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(_find(request, self._artifacts_of(None), self._parent_of))

    def _parent_of(self, artifact: Entity) -> str | None:
        return self._artifact_parent.get(artifact["id"])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": str(status), "message": message}, status=status)


async def _body(request: web.Request) -> Entity:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def _require(body: Entity, *fields: str) -> None:
    missing = [f for f in fields if not body.get(f)]
    if missing:
        raise ApiError(400, f"missing required field(s): {', '.join(missing)}")


def _check_enum(body: Entity, key: str, allowed: tuple[str, ...]) -> None:
    if key in body and body[key] not in allowed:
        raise ApiError(400, f"invalid {key} {body[key]!r}")


def _get(table: Mapping[str, Entity], request: web.Request, what: str) -> Entity:
    key = request.match_info["id"]
    if not re.fullmatch(r"[1-9][0-9]{0,8}", key):
        raise ApiError(400, f"invalid id {key!r}")
    try:
        return table[key]
    except KeyError:
        raise ApiError(404, f"{what} {key} not found") from None


def _patch(entity: Entity, body: Entity) -> Entity:
    for k, v in body.items():
        if k not in _IMMUTABLE and k != "name":
            entity[k] = v
    entity["lastUpdateTimeSinceEpoch"] = str(int(time.time() * 1000))
    return entity


def _find(
    request: web.Request,
    items: Iterable[Entity],
    parent_of: Callable[[Entity], str | None] | None,
) -> Entity:
    q = request.query
    name, external_id, parent = q.get("name"), q.get("externalId"), q.get("parentResourceId")
    if name is None and external_id is None:
        raise ApiError(400, "name or externalId is required")
    for item in items:
        if external_id is not None and item.get("externalId") != external_id:
            continue
        if name is not None and item.get("name") != name:
            continue
        scoped = name is not None and parent is not None and parent_of is not None
        if scoped and parent_of(item) != parent:  # type: ignore[misc]
            continue
        return item
    raise ApiError(404, "no entity matches the search parameters")


def _filter_artifacts(request: web.Request, items: list[Entity]) -> list[Entity]:
    kind = request.query.get("artifactType")
    name = request.query.get("name")
    return [
        a
        for a in items
        if (kind is None or a["artifactType"] == kind) and (name is None or a.get("name") == name)
    ]


_ORDER_KEYS: dict[str, Callable[[Entity], Any]] = {
    "ID": lambda e: int(e["id"]),
    "CREATE_TIME": lambda e: (int(e["createTimeSinceEpoch"]), int(e["id"])),
    "LAST_UPDATE_TIME": lambda e: (int(e["lastUpdateTimeSinceEpoch"]), int(e["id"])),
    "NAME": lambda e: (str(e.get("name", "")), int(e["id"])),
}


def _page(request: web.Request, items: list[Entity]) -> web.Response:
    q = request.query
    order = q.get("orderBy", "ID")
    if order not in _ORDER_KEYS:
        raise ApiError(400, f"invalid orderBy {order!r}")
    sort = q.get("sortOrder", "ASC")
    if sort not in ("ASC", "DESC"):
        raise ApiError(400, f"invalid sortOrder {sort!r}")
    if q.get("filterQuery"):
        m = _FILTER.match(q["filterQuery"])
        if m is None:
            raise ApiError(400, 'only `field = "value"` filters are supported here')
        field, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        items = [e for e in items if str(e.get(field)) == value]
    try:
        size = int(q.get("pageSize", "100"))
    except ValueError:
        raise ApiError(400, "invalid pageSize") from None
    if size < 1:
        raise ApiError(400, "invalid pageSize")
    ordered = sorted(items, key=_ORDER_KEYS[order], reverse=sort == "DESC")
    start = _decode_token(q.get("nextPageToken"))
    page = ordered[start : start + size]
    token = _encode_token(start + size) if start + size < len(ordered) else ""
    return web.json_response(
        {"items": page, "size": len(page), "pageSize": size, "nextPageToken": token}
    )


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("offset:"))
    except ValueError:
        raise ApiError(400, "invalid nextPageToken") from None


@contextmanager
def model_registry_server(
    host: str = LOOPBACK, token: str | None = None
) -> Iterator[ModelRegistryServer]:
    """A :class:`ModelRegistryServer` served from a thread; ``server.base_url`` is its URL."""
    server = ModelRegistryServer(token=token)
    with AppThread(server.make_app(), host=host, name="model-registry") as thread:
        server.base_url = thread.url
        yield server
