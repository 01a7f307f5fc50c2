"""Fixtures of the webhook tests: TLS material from trustme, the real webhook server on
127.0.0.1 over TLS, the fake API server, and a check that no test leaks a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from webhook_testkit import FakeApiServer

from webhook.admission import Context, Planner
from webhook.metrics import WebhookMetrics
from webhook.namespaces import NamespaceCache
from webhook.plan import plan
from webhook.server import Deps, make_app
from webhook.settings import PlanSettings
from webhook.tls import CertReloader


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if left:  # tasks being torn down get a moment to finish; the rest leaked
        await asyncio.wait(left, timeout=2)
    leaked = [t for t in left if not t.done()]
    assert not leaked, f"leaked tasks: {leaked}"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


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


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> CertFiles:
    files = CertFiles(tmp_path / "tls.crt", tmp_path / "tls.key")
    files.write(ca.issue_cert("127.0.0.1", "localhost"))
    return files


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@dataclass
class RunningWebhook:
    url: str
    deps: Deps
    reloader: CertReloader
    namespaces: NamespaceCache


@pytest.fixture
def plan_settings() -> PlanSettings:
    return PlanSettings()


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
    runner = web.AppRunner(make_app(deps), access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloader.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        # let connections the clients closed finish first: aiohttp's shutdown can strand a
        # handler that is draining an oversized body (lingering close) as a pending task
        assert runner.server is not None
        for _ in range(200):
            if not runner.server.connections:
                break
            await asyncio.sleep(0.01)
        await runner.cleanup()


@pytest.fixture
async def webhook(
    no_leaked_tasks: None, cert_files: CertFiles, plan_settings: PlanSettings
) -> AsyncIterator[RunningWebhook]:
    """The real webhook app over TLS, its certificate polled every 20 ms."""
    reloader = CertReloader(str(cert_files.cert), str(cert_files.key),
                            logging.getLogger("modelcache.webhook.test"))
    cache = NamespaceCache()
    cache.replace({"ml": {"kubernetes.io/metadata.name": "ml"}})
    deps = make_deps(reloader, plan_settings, cache)
    try:
        async with serve(deps, reloader) as url:
            yield RunningWebhook(url, deps, reloader, cache)
    finally:
        reloader.close()


@dataclass
class RunningApi:
    fake: FakeApiServer
    url: str


@pytest.fixture
async def fake_api(no_leaked_tasks: None) -> AsyncIterator[RunningApi]:
    """The fake API server over plain HTTP on 127.0.0.1."""
    fake = FakeApiServer()
    runner = web.AppRunner(fake.app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield RunningApi(fake, f"http://127.0.0.1:{port}")
    finally:
        await fake.drop_watches()
        await runner.cleanup()
