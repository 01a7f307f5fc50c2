"""Fixtures for the Kubernetes tests: a fake apiserver per test and clients of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client as k8s

from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import kube, kube_api, raw_kube  # noqa: F401


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
def api(kube_api: FakeKubeApi) -> FakeKubeApi:  # noqa: F811 (pytest injects it)
    return kube_api


@pytest.fixture
def raw(raw_kube: k8s.ApiClient) -> k8s.ApiClient:  # noqa: F811
    return raw_kube
