"""Fixtures of the webhook tests: TLS material from trustme, the real webhook server on
127.0.0.1 over TLS, the shared fake kube-apiserver as the webhook's cluster, and a check that
no test leaks a task."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from webhook_testkit import CertFiles, RunningWebhook, make_deps, serve, webhook_cluster

from tests.kubeapi import FakeKubeApi
from webhook.namespaces import NamespaceCache
from webhook.settings import PlanSettings
from webhook.tls import CertReloader


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


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


@pytest.fixture
def plan_settings() -> PlanSettings:
    return PlanSettings()


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


@pytest.fixture
async def kube_api(no_leaked_tasks: None) -> AsyncIterator[FakeKubeApi]:
    """The shared fake kube-apiserver as the webhook's cluster (see ``webhook_cluster``)."""
    async with webhook_cluster() as api:
        yield api
