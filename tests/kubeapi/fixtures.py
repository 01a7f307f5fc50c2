"""Pytest fixtures over the fake apiserver, for any test directory to import in its conftest:

    from tests.kubeapi.fixtures import kube, kube_api, raw_kube  # noqa: F401

``kube_api`` is a started ``FakeKubeApi`` where the agent's service account exists;
``kube`` is common.kube's client connected as that service account; ``raw_kube`` is a plain
kubernetes_asyncio client as cluster admin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from common.kube.client import KubeClient, connect
from common.kube.informer import Informer, WatchEvent
from common.kube.settings import KubeSettings
from tests.kubeapi.server import FakeKubeApi

AGENT_NAMESPACE = "modelcache"
AGENT_SA = "modelcache-agent"
AGENT_TOKEN = "agent-sa-token"
AGENT_USER = f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SA}"
#: fast retries, so that reconnect tests take milliseconds
FAST = KubeSettings(backoff_base=0.01, backoff_max=0.05, request_timeout=5.0)


@pytest.fixture
async def kube_api() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as server:
        server.cluster.create("namespaces", {"metadata": {"name": AGENT_NAMESPACE}})
        server.auth.add_service_account_token(AGENT_TOKEN, AGENT_NAMESPACE, AGENT_SA)
        yield server


@pytest.fixture
async def kube(kube_api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """common.kube's client as the agent's service account (allowed everything unless the
    test sets ``kube_api.enforce_rbac``)."""
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "agent.kubeconfig", token=AGENT_TOKEN)
    client = await connect(str(kubeconfig), FAST, instance="agent-node-1")
    yield client
    await client.close()


@pytest.fixture
async def raw_kube(kube_api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[k8s.ApiClient]:
    """A plain kubernetes_asyncio client, as cluster admin."""
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(kube_api.write_kubeconfig(tmp_path / "admin.kubeconfig")),
        client_configuration=cfg, persist_config=False,
    )
    async with k8s.ApiClient(cfg) as client:
        yield client


class Recorder:
    """Runs an informer in a task and queues what it reports."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self.informer.run(self._put))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _put(self, event: WatchEvent) -> None:
        self.queue.put_nowait(event)

    async def take(self, count: int) -> list[tuple[str, str, bool]]:
        """The next ``count`` events as (type, name, synthetic)."""
        async with asyncio.timeout(5):
            events = [await self.queue.get() for _ in range(count)]
        return [(e.type, e.object["metadata"]["name"], e.synthetic) for e in events]

    def nothing_more(self) -> bool:
        return self.queue.empty()
