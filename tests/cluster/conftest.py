"""Fixtures for the agent in a cluster: a fake apiserver per test, nodes, and agents running
in this process (the one harness, :class:`tests.servers.agent.InProcessAgent`, with a
Kubernetes client: the composition root's own ``build_in_cluster`` and ``serve``) that pull
from real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.settings import (
    AgentSettings,
    ApiSettings,
    ClusterSettings,
    EgressSettings,
    SourceSettings,
    StoreSettings,
    WarmModel,
)
from common.kube.client import connect
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import (  # noqa: F401
    AGENT_TOKEN,
    FAST,
    kube,
    kube_api,
    raw_kube,
)
from tests.kubeapi.objects import node
from tests.servers.agent import InProcessAgent
from webhook.counts import Counts

AUDIENCE = "modelcache"


@pytest.fixture
def api(kube_api: FakeKubeApi) -> FakeKubeApi:  # noqa: F811 (pytest injects it)
    for name in ("n1", "n2"):
        kube_api.cluster.create("nodes", node(name, {"pool": "gpu" if name == "n1" else "cpu"}))
    return kube_api


async def call(url: str, method: str, path: str, token: str | None = None,
               body: Any = None) -> tuple[int, Any]:
    """One request to an agent's admin API: (status, JSON reply)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


AgentFactory = Callable[..., contextlib.AbstractAsyncContextManager[InProcessAgent]]


@pytest.fixture
def agent_factory(api: FakeKubeApi, tmp_path: Path) -> AgentFactory:
    """``async with agent_factory("n1", status_interval=0.2) as agent``: an agent for a node,
    with ClusterSettings overridden by keyword; ``hf_endpoint=`` points hf:// at a hub,
    ``warm=`` are the config file's models."""

    @contextlib.asynccontextmanager
    async def start(name: str = "n1", hf_endpoint: str = "http://127.0.0.1:9",
                    warm: tuple[WarmModel, ...] = (), **cluster: Any
                    ) -> AsyncIterator[InProcessAgent]:
        settings = AgentSettings(
            node_name=name, standalone=False,
            store=StoreSettings(path=tmp_path / name / "store"),
            egress=EgressSettings(allow_hosts=("127.0.0.1",)),
            api=ApiSettings(listen="127.0.0.1:0"),
            sources=SourceSettings(hf_endpoint=hf_endpoint, control_retries=1),
            kube=FAST, warm=warm,
            cluster=replace(ClusterSettings(startup_jitter=0.0, pod_wait=1.0), **cluster),
        )
        kubeconfig = api.write_kubeconfig(tmp_path / f"{name}.kubeconfig", token=AGENT_TOKEN)
        async with await connect(str(kubeconfig), FAST, instance=name) as kube_client, \
                InProcessAgent(settings, kube=kube_client) as agent:
            yield agent

    return start


@pytest.fixture
async def agent(agent_factory: AgentFactory) -> AsyncIterator[InProcessAgent]:
    """The agent of node ``n1`` (labels ``pool=gpu``)."""
    async with agent_factory("n1") as a:
        yield a


async def eventually(agent: InProcessAgent, predicate: Callable[[], bool],
                     seconds: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, looking again at every change of the agent's index
    (pulls, pins, holders): no polling, no sleeping."""
    changed = asyncio.Event()
    agent.index.on_change(lambda _model: changed.set())
    async with asyncio.timeout(seconds):
        while not predicate():
            await changed.wait()
            changed.clear()


def entry(api: FakeKubeApi, name: str, node_name: str, namespace: str = "default"
          ) -> dict[str, Any]:
    """The entry of a CachedModel in a node's NodeCache (empty if absent)."""
    if not api.cluster.exists("nodecaches", node_name):
        return {}
    models = (api.cluster.get("nodecaches", node_name).get("status") or {}).get("models") or []
    return next((dict(m) for m in models
                 if (m.get("namespace"), m.get("name")) == (namespace, name)), {})


def counts(api: FakeKubeApi, name: str, namespace: str = "default") -> tuple[int, ...]:
    """A CachedModel's (ready, pulling, failed) as its status shows them (-1: not yet)."""
    status = api.cluster.get("cachedmodels", name, namespace).get("status") or {}
    return tuple(status.get(s, -1) for s in ("ready", "pulling", "failed"))


@pytest.fixture
async def counts_controller(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[Counts]:
    """The webhook's counts controller, summing the NodeCaches into CachedModels' counts
    (as the replica holding the Lease runs it; written at once, no interval)."""
    kubeconfig = api.write_kubeconfig(tmp_path / "counts.kubeconfig")
    async with await connect(str(kubeconfig), FAST, instance="webhook") as kube_client:
        controller = Counts(kube_client, interval=0.0)
        task = asyncio.create_task(controller.run())
        yield controller
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def node_labels(api: FakeKubeApi, name: str) -> dict[str, str]:
    return {k: v for k, v in api.cluster.get("nodes", name)["metadata"]["labels"].items()
            if k.startswith("modelcache.io/m-")}


def reasons(api: FakeKubeApi, name: str) -> list[str]:
    """Reasons of the Events about an object, oldest first."""
    return [e.get("reason", "") for e in api.cluster.events(name)]
