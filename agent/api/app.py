"""The agent's admin HTTP API (DESIGN.md, "Agent admin HTTP API"), built by ``make_app``.

HTTP status codes are chosen here and only here, from the error's class. Every error reply
is ``{"error": "..."}``. Probes and metrics are not access-logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.auth import Authenticator
from agent.eviction.evictor import Evictor
from agent.eviction.leases import Leases, check_lease
from agent.eviction.reservations import Reservations
from agent.eviction.usage import Usage
from agent.index import Index
from agent.metrics import CONTENT_TYPE, Metrics
from agent.pagecache.warmer import PageCacheWarmer
from agent.pull.credentials import CredentialsProvider
from agent.pull.puller import Puller
from agent.settings import AgentSettings
from agent.store.blobs import valid_digest
from agent.store.local import Store
from agent.store.trees import iso
from common import errors
from common.reference import KEY_HEX, scoped

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
_KEY = re.compile(rf"^[0-9a-f]{{{KEY_HEX}}}$")


@dataclass
class AgentState:
    ready: bool = False
    """True once the store is recovered and the agent accepts work."""
    stopping: bool = False
    address: str = ""
    """HOST:PORT the API listens on (known once it is bound)."""


@dataclass
class Deps:
    settings: AgentSettings
    store: Store
    index: Index
    puller: Puller
    evictor: Evictor
    leases: Leases
    """Standalone in-use information: the API's leases."""
    reservations: Reservations
    """The space running pulls hold."""
    metrics: Metrics
    auth: Authenticator
    credentials: CredentialsProvider
    usage: Usage
    """Who uses which model (pods, leases); ``usage.known`` once all of it is known."""
    warmer: PageCacheWarmer
    """Reads an ensured model into the page cache for the pod about to load it."""
    state: AgentState = field(default_factory=AgentState)


DEPS = web.AppKey("deps", Deps)

STATUS: list[tuple[type[errors.ModelcacheError], int]] = [
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.NotAllowed, 403),
    (errors.InvalidInput, 400),
    (errors.NotFound, 404),
    (errors.VerificationFailed, 422),
    (errors.SourceNotFound, 404),
    (errors.Conflict, 409),
    (errors.Locked, 409),
    (errors.NoSpace, 507),
    (errors.ShuttingDown, 503),
    (errors.SourceAuthError, 502),
    (errors.SourceError, 502),
]


def status_of(e: errors.ModelcacheError) -> int:
    for cls, status in STATUS:
        if isinstance(e, cls):
            return status
    return 500


def error_reply(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="modelcache"'} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ModelcacheError as e:
        return error_reply(status_of(e), str(e))
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return error_reply(e.status, e.reason)
        raise
    except Exception:
        log.exception("API handler crashed", extra={"path": request.path})
        return error_reply(500, "internal error (see the agent's log)")


def make_app(deps: Deps) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/models", list_models)
    app.router.add_post("/api/v1/models", ensure_model)
    app.router.add_get("/api/v1/models/{key}", get_model)
    app.router.add_delete("/api/v1/models/{key}", delete_model)
    app.router.add_post("/api/v1/models/{key}/fallback", report_fallback)
    app.router.add_post("/api/v1/models/{key}/leases", take_lease)
    app.router.add_delete("/api/v1/models/{key}/leases/{owner}", release_lease)
    app.router.add_get("/api/v1/store", store_info)
    app.router.add_post("/api/v1/gc", gc)
    app.router.add_get("/api/v1/blobs/{digest}", get_blob)
    return app


# --- probes and metrics --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[DEPS].state
    if state.ready and not state.stopping:
        return web.json_response({"status": "ready"})
    return error_reply(503, "stopping" if state.stopping else "recovering the store")


async def metrics(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await update_gauges(deps)
    body = deps.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def update_gauges(deps: Deps) -> None:
    usage = await asyncio.to_thread(deps.store.usage)
    m = deps.metrics
    m.store_bytes.labels(kind="used").set(usage.used_bytes)
    m.store_bytes.labels(kind="capacity").set(usage.capacity_bytes)
    m.store_bytes.labels(kind="cached").set(usage.cache_bytes)
    m.store_bytes.labels(kind="dedup_saved").set(usage.dedup_saved_bytes)
    m.store_bytes.labels(kind="reserved").set(deps.reservations.reserved_bytes())
    m.store_blobs.set(usage.blobs)
    for state, n in deps.index.counts().items():
        m.models.labels(state=state).set(n)


# --- models --------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "read")
    models = sorted(deps.index, key=lambda m: m.key)
    return web.json_response({"models": [m.to_json() for m in models]})


async def ensure_model(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = await deps.auth.authenticate(request, "ensure")
    body = await _json_body(request)
    uri = body.get("uri")
    if not isinstance(uri, str):
        raise errors.InvalidInput('body needs "uri": a model reference string')
    include = body.get("include")
    if include is not None and not (isinstance(include, list)
                                    and all(isinstance(g, str) for g in include)):
        raise errors.InvalidInput('"include" must be a list of glob strings')
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise errors.InvalidInput('"pin" must be true or false')
    cred_name = body.get("credentials")
    if cred_name is not None and not isinstance(cred_name, str):
        raise errors.InvalidInput('"credentials" must be the name of a Secret')
    verify = body.get("verify")
    if verify is not None and not isinstance(verify, str):
        raise errors.InvalidInput('"verify" must be the name of a signature policy')
    # a pod is about to load the model (its init container asks): read it into the page
    # cache; an operator's pull or prefetch fills the disk only
    warm = body.get("warm", caller.pod is not None)
    if not isinstance(warm, bool):
        raise errors.InvalidInput('"warm" must be true or false')
    unknown = set(body) - {"uri", "include", "pin", "credentials", "verify", "warm"}
    if unknown:
        raise errors.InvalidInput(f"unknown field(s) in body: {', '.join(sorted(unknown))}")
    ref = scoped(uri, include, namespace=caller.namespace, credentials=cred_name or None,
                 verify=verify)
    await deps.auth.admit(caller, ref, cred_name, pin)
    credentials = None
    if cred_name:
        credentials = await deps.credentials.get(caller.namespace, cred_name)
    model = await deps.puller.ensure(ref, credentials=credentials, pin=pin,
                                     credentials_name=cred_name, namespace=caller.namespace)
    if warm:
        deps.warmer.want(model.key, pod=caller.pod, trigger="ensure")
    return web.json_response(model.to_json(), status=202)


async def get_model(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "read")
    key = _key(request)
    model = deps.index.get(key)
    if model is None:
        raise errors.NotFound(f"model {key} is not in the store")
    wait = request.query.get("wait")
    if wait is not None:
        try:
            seconds = float(wait)
        except ValueError:
            raise errors.InvalidInput(f"wait={wait!r} is not a number of seconds") from None
        if not 0 <= seconds <= deps.settings.api.max_wait:
            raise errors.InvalidInput(
                f"wait must be between 0 and {deps.settings.api.max_wait:g} seconds")
        found = await deps.index.wait(key, seconds)
        if found is None:
            raise errors.NotFound(f"model {key} was removed")
        model = found
    return web.json_response(model.to_json())


async def delete_model(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "write")
    key = _key(request)
    force = request.query.get("force", "false").lower() in ("1", "true", "yes")
    model, freed = await deps.evictor.remove(key, force=force)
    reply = model.to_json()
    reply["state"] = "evicted"
    reply["freed_bytes"] = freed
    return web.json_response(reply)


async def report_fallback(request: web.Request) -> web.Response:
    """An init container tells that it got the model from the source itself (the agent
    could not serve it): counted as a ``fallback`` cache request. Best effort by nature."""
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "write")
    key = _key(request)
    deps.metrics.cache_requests.labels(result="fallback").inc()
    log.info("a pod fell back to the source", extra={"key": key})
    return web.json_response({"key": key, "counted": "fallback"}, status=202)


async def take_lease(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "write")
    key = _key(request)
    body = await _json_body(request)
    unknown = set(body) - {"owner", "ttl_seconds"}
    if unknown:
        raise errors.InvalidInput(f"unknown field(s) in body: {', '.join(sorted(unknown))}")
    owner, ttl = check_lease(body.get("owner"), body.get("ttl_seconds"))
    expires = await deps.leases.take(key, owner, ttl)
    return web.json_response({"owner": owner, "expires": iso(expires)}, status=201)


async def release_lease(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "write")
    key = _key(request)
    owner = request.match_info["owner"]
    await deps.leases.release(key, owner)
    return web.json_response({"owner": owner, "released": True})


# --- store ---------------------------------------------------------------------------------


async def store_info(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "read")
    usage = await asyncio.to_thread(deps.store.usage)
    limits = deps.evictor.limits
    return web.json_response({
        "path": str(deps.store.root),
        "capacity_bytes": usage.capacity_bytes,
        "used_bytes": usage.used_bytes,
        "cache_bytes": usage.cache_bytes,
        "blobs": usage.blobs,
        "dedup_saved_bytes": usage.dedup_saved_bytes,
        "high_watermark": limits.high,
        "low_watermark": limits.low,
    })


async def gc(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "write")
    freed = await deps.evictor.collect()
    return web.json_response({"freed_bytes": freed})


async def get_blob(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    await deps.auth.authenticate(request, "peer")
    digest = request.match_info["digest"]
    if not valid_digest(digest):
        raise errors.InvalidInput("a blob digest is 64 lowercase hex characters (blake3)")
    path = await asyncio.to_thread(deps.store.blob_path, digest)
    if path is None:
        raise errors.NotFound(f"blob {digest} is not in the store")
    response = web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
    size = (await asyncio.to_thread(path.stat)).st_size
    deps.metrics.served_bytes.labels(to="peer").inc(_range_length(request, size))
    return response


# --- helpers -------------------------------------------------------------------------------


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if not _KEY.match(key):
        raise errors.InvalidInput(f"a model key is {KEY_HEX} lowercase hex characters")
    return key


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise errors.InvalidInput("the body must be JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.InvalidInput(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise errors.InvalidInput("the body must be a JSON object")
    return body


def _range_length(request: web.Request, size: int) -> int:
    try:
        rng = request.http_range
    except ValueError:
        return 0
    start, stop, _ = rng.indices(size) if rng.start is not None or rng.stop is not None \
        else (0, size, 1)
    return max(0, stop - start)
