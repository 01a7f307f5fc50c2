"""The webhook's HTTPS application: ``POST /mutate``, ``/healthz``, ``/readyz``, ``/metrics``.

Built by :func:`make_app` from explicit dependencies (typed ``web.AppKey``, no module-level
state); background work (the namespace watch, the certificate poll) starts and stops with
the app through its cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .admission import Context, admit
from .metrics import CONTENT_TYPE, WebhookMetrics


@dataclass
class Health:
    """Readiness, switched off first at shutdown so endpoints drop the pod."""

    ready: bool = False


@dataclass(frozen=True)
class Deps:
    admission: Context
    metrics: WebhookMetrics
    log: logging.Logger
    max_body_bytes: int
    health: Health = field(default_factory=Health)
    background: tuple[Callable[[], Awaitable[None]], ...] = ()
    """Long-running coroutines started with the app and cancelled when it stops."""


DEPS = web.AppKey("deps", Deps)

#: an oversized body is drained for at most this long after its 413, so the client reads
#: the answer before the connection closes (aiohttp's default is 10 s)
LINGER_SECONDS = 1.0
TASKS = web.AppKey("tasks", list[asyncio.Task[None]])


def make_app(deps: Deps) -> web.Application:
    app = web.Application(client_max_size=deps.max_body_bytes)
    app[DEPS] = deps
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_background)
    return app


def make_runner(deps: Deps, shutdown_timeout: float) -> web.AppRunner:
    """The app's runner: no access log (probes are not logged), short lingering close."""
    return web.AppRunner(make_app(deps), handle_signals=False, access_log=None,
                         lingering_time=LINGER_SECONDS, shutdown_timeout=shutdown_timeout)


async def _background(app: web.Application) -> AsyncIterator[None]:
    deps = app[DEPS]
    tasks = [asyncio.create_task(_guarded(job, deps.log)) for job in deps.background]
    app[TASKS] = tasks
    deps.health.ready = True
    yield
    deps.health.ready = False
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _guarded(job: Callable[[], Awaitable[None]], log: logging.Logger) -> None:
    try:
        await job()
    except asyncio.CancelledError:
        raise
    except Exception:  # a background job must not die silently
        log.exception("background task failed")


async def mutate(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    start = time.perf_counter()
    outcome = await admit(request, deps.admission, deps.max_body_bytes)
    elapsed = time.perf_counter() - start
    deps.metrics.admissions.labels(outcome=outcome.outcome).inc()
    deps.metrics.duration.observe(elapsed)
    fields = {**outcome.fields, "outcome": outcome.outcome, "ms": round(elapsed * 1000, 3)}
    if outcome.crash is not None:
        deps.log.error("admission crashed", extra=fields, exc_info=outcome.crash)
    elif outcome.outcome in ("error", "denied"):
        deps.log.info(f"admission {outcome.outcome}", extra=fields)
    elif outcome.outcome == "mutated":
        deps.log.info("admission mutated", extra=fields)
    else:
        deps.log.debug("admission skipped", extra=fields)
    response = web.json_response(outcome.body, status=outcome.status)
    if outcome.status == 413:
        response.force_close()  # do not drain the rest of an oversized body
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[DEPS].health.ready:
        return web.Response(text="ok\n")
    return web.Response(status=503, text="not ready\n")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[DEPS].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
