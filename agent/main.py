"""The agent's composition root: builds everything once, runs it, shuts it down in order.

SIGTERM -> not ready -> stop accepting -> running pulls checkpoint and stop (they resume at
the next start) -> close clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__
from agent.api.app import DEPS, Deps, make_app
from agent.auth import Authenticator, TokenFileAuth
from agent.cluster.auth import KubeAuth
from agent.cluster.controller import Controller
from agent.cluster.pods import PodDirectory, warm_refusal
from agent.csi.access import TokenReviewer
from agent.csi.plugin import CsiPlugin
from agent.egress import Egress
from agent.eviction.evictor import Evictor
from agent.eviction.leases import Leases
from agent.eviction.ledger import Ledger
from agent.eviction.reservations import Reservations
from agent.eviction.usage import Usage
from agent.fetch.engine import Fetcher
from agent.index import Index
from agent.metrics import Metrics
from agent.pagecache.warmer import PageCacheWarmer
from agent.pull.credentials import CredentialsProvider, DirectoryCredentials, SecretCredentials
from agent.pull.puller import Puller
from agent.pull.sharing import SharedAccess
from agent.settings import AgentSettings
from agent.sources.catalog import build_sources
from agent.store.local import Store
from agent.store.recovery import recover
from agent.verify.policy import ConfigMapPolicies, ConfigPolicies, PolicyProvider
from common.errors import ModelcacheError
from common.kube.client import KubeClient, connect
from common.reference import parse, split_host_port

log = logging.getLogger(__name__)
REFRESH_CHECK_SECONDS = 60.0


async def build(settings: AgentSettings, *, auth: Authenticator | None = None,
                credentials: CredentialsProvider | None = None,
                credentials_dir: Path | None = None,
                pod_refusal: Callable[[str], str | None] | None = None,
                policies: PolicyProvider | None = None) -> Deps:
    """Recover the store and wire the agent's parts together (nothing is served yet).
    ``pod_refusal``: why a pod's model must not be warmed in the page cache (cluster)."""
    if policies is None:  # standalone: the config file's, each checked now
        configured = ConfigPolicies(settings.verify_policies)
        await asyncio.to_thread(configured.check_all)
        policies = configured
    store = Store(settings.store.path)
    report = await asyncio.to_thread(recover, store)
    log.info("store recovered", extra={
        "path": str(store.root), "models": report.models, "blobs": report.blobs,
        "resuming": len(report.intents), "removed_partials": report.removed_partials,
        "removed_blobs": report.removed_blobs, "broken_models": report.broken_models})
    metrics = Metrics(node=settings.node_name, version=__version__)
    metrics.store_watermark.labels(level="high").set(settings.store.high_watermark)
    metrics.store_watermark.labels(level="low").set(settings.store.low_watermark)
    egress = Egress(settings.egress)
    fetcher = Fetcher(store, egress, settings.fetch, settings.archive)
    index = Index()
    # standalone, nothing but the API holds models: in-use is known once the leases are
    # loaded; in a cluster, once the pods on the node are listed (agent/cluster.py)
    usage = Usage(index, known=False)
    leases = Leases(store.leases_file, store.tmp, index, usage)
    ledger = Ledger(store, index)
    evictor = Evictor(store, index, settings.store, usage, ledger, leases, metrics)
    reservations = Reservations(evictor, ledger)
    sharing = None if settings.standalone else SharedAccess(settings.cluster.access_ttl)
    puller = Puller(store=store, fetcher=fetcher, sources=build_sources(egress, settings),
                    index=index, egress=egress, settings=settings, metrics=metrics,
                    reserver=reservations, sharing=sharing, policies=policies)
    await leases.load()  # before the models load, so each gets its leases
    puller.load()
    if settings.standalone:
        usage.known.set()
    gc.collect()
    gc.freeze()  # what start-up loaded (manifests, index) is left out of later collections:
    # with 100k blobs a full collection would pause the event loop for tens of ms
    if auth is None:
        assert settings.api.token_file is not None
        auth = await asyncio.to_thread(TokenFileAuth.from_file, settings.api.token_file)
    warmer = PageCacheWarmer(settings.page_cache, store, index, metrics,
                             pod_refusal=pod_refusal)
    return Deps(settings=settings, store=store, index=index, puller=puller,
                evictor=evictor, leases=leases, reservations=reservations,
                metrics=metrics, auth=auth,
                credentials=credentials or DirectoryCredentials(credentials_dir),
                usage=usage, warmer=warmer)


async def build_in_cluster(settings: AgentSettings, kube: KubeClient
                           ) -> tuple[Deps, Controller]:
    """The agent of a cluster node: callers authenticated by the cluster, credentials from
    Secrets, and the controller that watches CachedModels, pods and the node."""
    pods = PodDirectory()
    auth = KubeAuth(kube, pods, settings.node_name, settings.cluster)
    deps = await build(settings, auth=auth, credentials=SecretCredentials(kube),
                       pod_refusal=lambda key: warm_refusal(pods.get(key)),
                       policies=ConfigMapPolicies(kube))
    controller = Controller(kube, settings, deps.index, deps.puller, deps.credentials, pods,
                            deps.usage, deps.warmer, claim=deps.store.claim_model_dir)
    deps.evictor.on_evicting(controller.evicting)  # the status and Event say why
    deps.evictor.on_pressure(controller.pressure)  # a Node Event per forced sweep
    return deps, controller


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: resume interrupted pulls, prefetch warm models, refresh, evict."""
    deps = app[DEPS]
    tasks = [asyncio.create_task(_start_work(deps), name="start-work"),
             asyncio.create_task(_refresh_loop(deps), name="refresh"),
             asyncio.create_task(deps.evictor.run(), name="evict")]
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _start_work(deps: Deps) -> None:
    resumed = await deps.puller.resume(deps.credentials)
    if resumed:
        log.info("resumed interrupted pulls", extra={"keys": resumed})
    for warm in deps.settings.warm:
        try:
            await deps.puller.ensure(parse(warm.uri, warm.include, warm.verify), pin=warm.pin,
                                     count=False)
        except ModelcacheError as e:
            log.error("cannot keep a configured model warm",
                      extra={"uri": warm.uri, "error": str(e)})


async def _refresh_loop(deps: Deps) -> None:
    while True:
        await asyncio.sleep(REFRESH_CHECK_SECONDS)
        deps.puller.refresh_due()


def csi_plugin(deps: Deps, reviewer: TokenReviewer | None = None) -> CsiPlugin | None:
    """The CSI node plugin, if ``--csi-endpoint`` asks for one (``reviewer``: the cluster's
    TokenReview; None standalone)."""
    if deps.settings.csi.endpoint is None:
        return None
    return CsiPlugin.create(deps.settings, store=deps.store, index=deps.index,
                            puller=deps.puller, usage=deps.usage, credentials=deps.credentials,
                            metrics=deps.metrics, reviewer=reviewer, warmer=deps.warmer,
                            ready=lambda: deps.state.ready and not deps.state.stopping)


async def serve(deps: Deps, stop: asyncio.Event, started: asyncio.Event | None = None,
                background: Callable[[], Coroutine[Any, Any, None]] | None = None,
                csi: CsiPlugin | None = None) -> None:
    """Serve the admin API (and the CSI node service) until ``stop`` is set, then shut down
    in order. ``background`` (the cluster controller) runs while the API serves and is
    stopped first."""
    app = make_app(deps)
    app.cleanup_ctx.append(_background)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=deps.settings.shutdown_grace)
    if csi is not None:
        await csi.recover()  # before the background work (eviction) starts
    await runner.setup()
    host, port = split_host_port(deps.settings.api.listen, 9400)
    site = web.TCPSite(runner, host, port)
    task: asyncio.Task[None] | None = None
    try:
        await site.start()
        if csi is not None:
            await csi.start()
        if background is not None:
            task = asyncio.create_task(background(), name="cluster")
        bound = runner.addresses[0]
        deps.state.address = f"{bound[0]}:{bound[1]}" if ":" not in bound[0] \
            else f"[{bound[0]}]:{bound[1]}"
        deps.state.ready = True
        log.info("agent ready", extra={"listen": deps.settings.api.listen,
                                       "node": deps.settings.node_name,
                                       "store": str(deps.store.root)})
        if started is not None:
            started.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        deps.state.ready = False
        deps.state.stopping = True
        if csi is not None:
            await csi.stop(deps.settings.shutdown_grace / 2)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the cluster controller failed")
        await deps.warmer.close()
        await deps.puller.stop()
        await runner.cleanup()
        await deps.puller.fetcher.close()
        for source in {id(s): s for s in deps.puller.sources.values()}.values():
            with contextlib.suppress(Exception):
                await source.close()
        log.info("agent stopped")


async def run(settings: AgentSettings, credentials_dir: Path | None = None) -> None:
    """``modelcache agent``: build, serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.standalone:
        deps = await build(settings, credentials_dir=credentials_dir)
        await serve(deps, stop, csi=csi_plugin(deps))
        return
    async with await connect(None, settings.kube, instance=settings.node_name) as kube:
        deps, controller = await build_in_cluster(settings, kube)
        await serve(deps, stop, background=controller.run, csi=csi_plugin(deps, kube))
