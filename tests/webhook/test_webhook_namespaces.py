"""The namespace label cache and its informer, against the shared fake kube-apiserver of
``tests/kubeapi`` enforcing the webhook's own RBAC (deploy/base/rbac-webhook.yaml): list
(paginated), watch with bookmarks, 410 Gone as an event and as a status, dropped streams,
refused credentials, an unreachable server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from webhook_testkit import WEBHOOK_TOKEN, WEBHOOK_USER

from common.kube.client import connect
from common.kube.settings import KubeSettings
from tests.kubeapi import FakeKubeApi, Request
from tests.kubeapi.objects import namespace, node
from webhook.namespaces import NamespaceWatch

ENFORCE = "pod-security.kubernetes.io/enforce"
RESTRICTED = {ENFORCE: "restricted"}
TIMEOUT = 10


def labels(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A namespace's labels as the apiserver keeps them (it adds its name label)."""
    return {"kubernetes.io/metadata.name": name, **(extra or {})}


@contextlib.asynccontextmanager
async def watching(kubeconfig: Path, page_size: int = 500) -> AsyncIterator[NamespaceWatch]:
    """A running NamespaceWatch through the shared client; cancelled and awaited on exit."""
    fast = KubeSettings(backoff_base=0.01, backoff_max=0.05, request_timeout=5.0,
                        list_page_size=page_size)
    async with await connect(str(kubeconfig), fast) as kube:
        watch = NamespaceWatch(kube.watch_namespaces())
        task = asyncio.create_task(watch.run())
        try:
            yield watch
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(watch: NamespaceWatch, predicate: Callable[[NamespaceWatch], bool]) -> None:
    await asyncio.wait_for(watch.wait_for(predicate), TIMEOUT)


async def opened(kube_api: FakeKubeApi, nth: int = 1) -> Request:
    """The ``nth`` namespace watch, once it is open."""
    return await asyncio.wait_for(kube_api.wait_for_watch("namespaces", nth), TIMEOUT)


@pytest.fixture
def kubeconfig(kube_api: FakeKubeApi, tmp_path: Path) -> Path:
    """The webhook's service account's kubeconfig."""
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig", token=WEBHOOK_TOKEN)


async def test_list_then_watch_keeps_labels_current(kube_api: FakeKubeApi,
                                                    kubeconfig: Path) -> None:
    c = kube_api.cluster
    c.create("namespaces", namespace("ml", RESTRICTED))
    c.create("namespaces", namespace("dev"))
    async with watching(kubeconfig) as watch:
        cache = watch.cache
        assert cache.labels("ml") is None  # unknown until the first list
        await until(watch, lambda w: w.cache.synced)
        await opened(kube_api)
        assert cache.labels("ml") == labels("ml", RESTRICTED)
        assert cache.labels("dev") == labels("dev")
        assert cache.labels("nowhere") is None
        c.patch("namespaces", "dev", {"metadata": {"labels": {ENFORCE: "baseline"}}})
        c.create("namespaces", namespace("new", RESTRICTED))
        await until(watch, lambda w: w.cache.labels("new") == labels("new", RESTRICTED))
        assert cache.labels("dev") == labels("dev", {ENFORCE: "baseline"})
        c.delete("namespaces", "ml")
        await until(watch, lambda w: w.cache.labels("ml") is None)
        assert watch.lists == 1
        assert watch.resource_version == str(c.rv)
    mine = [r for r in kube_api.requests if r.user == WEBHOOK_USER]
    assert mine and all(r.status == 200 for r in mine), "the webhook's RBAC suffices"


async def test_the_first_list_comes_whole_from_the_watch_cache(
        kube_api: FakeKubeApi, kubeconfig: Path) -> None:
    """``resourceVersion=0``: the apiserver's watch cache answers, not etcd, and it ignores
    the page size (a relist in pages is tests/kube's)."""
    for i in range(5):
        kube_api.cluster.create("namespaces", namespace(f"ns-{i}", {"i": str(i)}))
    total = len(kube_api.cluster.list("namespaces")["items"])
    async with watching(kubeconfig, page_size=2) as watch:
        await until(watch, lambda w: w.cache.synced)
        assert len(watch.cache) == total
        assert watch.cache.labels("ns-4") == labels("ns-4", {"i": "4"})
    [listed] = [r for r in kube_api.requests if r.verb == "list" and r.resource == "namespaces"]
    assert (listed.query["resourceVersion"], listed.served_from) == ("0", "cache")


async def test_gone_event_in_the_stream_means_list_again(kube_api: FakeKubeApi,
                                                         kubeconfig: Path) -> None:
    c = kube_api.cluster
    c.create("namespaces", namespace("ml"))
    async with watching(kubeconfig) as watch:
        await opened(kube_api)
        # etcd compacts under the watcher, which is told 410; the change made meanwhile is
        # not sent on that stream: only a list can bring it
        assert c.expire_watches("namespaces") == 1
        c.patch("namespaces", "ml", {"metadata": {"labels": RESTRICTED}})
        await until(watch, lambda w: w.cache.labels("ml") == labels("ml", RESTRICTED))
        assert watch.lists == 2
        c.create("namespaces", namespace("after", {"a": "b"}))
        await until(watch, lambda w: w.cache.labels("after") == labels("after", {"a": "b"}))
        assert watch.failures == 0


async def test_gone_status_on_reconnect_means_list_again(kube_api: FakeKubeApi,
                                                         kubeconfig: Path) -> None:
    c = kube_api.cluster
    c.create("namespaces", namespace("ml"))
    async with watching(kubeconfig) as watch:
        await opened(kube_api)
        # the stream drops; the reconnect from its version is refused with HTTP 410
        kube_api.fail_next("watch", "namespaces", code=410,
                           message=f"too old resource version: {watch.resource_version}")
        c.break_watches("namespaces")
        await until(watch, lambda w: w.lists == 2)
        await opened(kube_api, 3)
        assert kube_api.count("watch", "namespaces", status=410) == 1
        c.create("namespaces", namespace("later", RESTRICTED))
        await until(watch, lambda w: w.cache.labels("later") == labels("later", RESTRICTED))


async def test_dropped_stream_resumes_from_the_bookmark(kube_api: FakeKubeApi,
                                                        kubeconfig: Path) -> None:
    c = kube_api.cluster
    c.create("namespaces", namespace("ml"))
    async with watching(kubeconfig) as watch:
        await opened(kube_api)
        for i in range(3):  # writes to other resources move the global version
            c.create("nodes", node(f"n{i}"))
        c.send_bookmarks()
        await until(watch, lambda w: w.resource_version == str(c.rv))
        c.break_watches("namespaces")
        second = await opened(kube_api, 2)
        assert watch.lists == 1, "a dropped stream is resumed, not relisted"
        assert second.query["resourceVersion"] == str(c.rv)
        assert second.query["allowWatchBookmarks"].lower() == "true"


async def test_refused_credentials_warn_once_and_retry(
    kube_api: FakeKubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube_api.cluster.create("namespaces", namespace("ml", RESTRICTED))
    token = "wrong-token-0123456789"
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig", token=token)
    with caplog.at_level(logging.INFO):
        async with watching(kubeconfig) as watch:
            await until(watch, lambda w: w.failures >= 3)
            assert watch.cache.labels("ml") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "401" in warnings[0].error  # type: ignore[attr-defined]
    assert token not in caplog.text  # the token is never logged


async def test_unreachable_api_server_keeps_labels_unknown(no_leaked_tasks: None,
                                                           tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(  # the discard port: nothing listens
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    async with watching(kubeconfig) as watch:
        await until(watch, lambda w: w.failures >= 2)
        assert not watch.cache.synced
        assert watch.cache.labels("default") is None
