"""Fixtures for the Kubernetes tests: a fake apiserver per test and clients of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from agent.kube import KubeClient, connect
from agent.settings import KubeSettings
from tests.kubeapi import FakeKubeApi

AGENT_NAMESPACE = "modelcache"
AGENT_SA = "modelcache-agent"
AGENT_TOKEN = "agent-sa-token"
#: fast retries so that reconnect tests take milliseconds
FAST = KubeSettings(backoff_base=0.01, backoff_max=0.05, request_timeout=5.0)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before
              if t is not asyncio.current_task() and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"tasks leaked: {leaked}"


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as server:
        server.cluster.create("namespaces", {"metadata": {"name": AGENT_NAMESPACE}})
        server.auth.add_service_account_token(AGENT_TOKEN, AGENT_NAMESPACE, AGENT_SA)
        yield server


@pytest.fixture
async def kube(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """agent.kube's client, connected as the agent's service account (all allowed unless the
    test sets ``api.enforce_rbac``)."""
    kubeconfig = api.write_kubeconfig(tmp_path / "agent.kubeconfig", token=AGENT_TOKEN)
    client = await connect(str(kubeconfig), FAST, instance="agent-node-1")
    yield client
    await client.close()


@pytest.fixture
async def raw(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[k8s.ApiClient]:
    """A plain kubernetes_asyncio client, as cluster admin."""
    cfg = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(api.write_kubeconfig(tmp_path / "admin.kubeconfig")),
        client_configuration=cfg, persist_config=False,
    )
    async with k8s.ApiClient(cfg) as client:
        yield client

