"""The namespace label cache and its watch, against the fake API server on 127.0.0.1:
list (paginated), watch with bookmarks, 410 Gone as an event and as a status, dropped
streams, refused credentials; and finding the cluster configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from webhook_testkit import FakeApiServer, RunningApi

from common.backoff import Backoff
from webhook.cluster import ClusterConfig, KubeApi, find_config
from webhook.namespaces import NamespaceCache, NamespaceWatch

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
TIMEOUT = 10


@contextlib.asynccontextmanager
async def watching(
    api_url: str, token: str = "test-token", page_size: int = 500,  # noqa: S107
) -> AsyncIterator[NamespaceWatch]:
    """A running NamespaceWatch against the fake; cancelled and awaited on exit."""
    config = ClusterConfig(server=api_url, source="test", token=token)
    async with aiohttp.ClientSession() as session:
        watch = NamespaceWatch(
            KubeApi(config, session), NamespaceCache(), logging.getLogger("test.namespaces"),
            backoff=Backoff(base=0.01, cap=0.05), page_size=page_size,
        )
        task = asyncio.create_task(watch.run())
        try:
            yield watch
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(watch: NamespaceWatch, predicate: Callable[[NamespaceWatch], bool]) -> None:
    await asyncio.wait_for(watch.wait_for(predicate), TIMEOUT)


async def watches(fake: FakeApiServer, count: int) -> None:
    await asyncio.wait_for(fake.wait_watches(count), TIMEOUT)


async def test_list_then_watch_keeps_labels_current(fake_api: RunningApi) -> None:
    fake = fake_api.fake
    await fake.put_namespace("ml", RESTRICTED)
    await fake.put_namespace("dev", {})
    async with watching(fake_api.url) as watch:
        cache = watch.cache
        assert cache.labels("ml") is None  # unknown until the first list
        await until(watch, lambda w: w.cache.synced)
        await watches(fake, 1)
        assert cache.labels("ml") == RESTRICTED
        assert cache.labels("dev") == {}
        assert cache.labels("nowhere") is None
        await fake.put_namespace("dev", {"pod-security.kubernetes.io/enforce": "baseline"})
        await fake.put_namespace("new", RESTRICTED)
        await until(watch, lambda w: w.cache.labels("new") == RESTRICTED)
        assert cache.labels("dev") == {"pod-security.kubernetes.io/enforce": "baseline"}
        await fake.delete_namespace("ml")
        await until(watch, lambda w: w.cache.labels("ml") is None)
        assert watch.lists == 1
        assert watch.resource_version == str(fake.rv)


async def test_list_follows_continue_tokens(fake_api: RunningApi) -> None:
    for i in range(5):
        await fake_api.fake.put_namespace(f"ns-{i}", {"i": str(i)})
    async with watching(fake_api.url, page_size=2) as watch:
        await until(watch, lambda w: w.cache.synced)
        assert len(watch.cache) == 5
        assert watch.cache.labels("ns-4") == {"i": "4"}
    lists = [r for r in fake_api.fake.requests if "watch" not in r]
    assert len(lists) == 3 and "continue=2" in lists[1] and "continue=4" in lists[2]


async def test_gone_event_in_the_stream_means_list_again(fake_api: RunningApi) -> None:
    fake = fake_api.fake
    await fake.put_namespace("ml", {})
    async with watching(fake_api.url) as watch:
        await watches(fake, 1)
        fake.compact()
        # changed while the watcher is about to be told its version is gone: only a list
        # can bring it back
        fake.namespaces["ml"]["metadata"]["labels"] = dict(RESTRICTED)
        await fake.expire_watches()
        await until(watch, lambda w: w.lists == 2)
        assert watch.cache.labels("ml") == RESTRICTED
        await fake.put_namespace("after", {"a": "b"})
        await until(watch, lambda w: w.cache.labels("after") == {"a": "b"})
        assert watch.failures == 0


async def test_gone_status_on_reconnect_means_list_again(fake_api: RunningApi) -> None:
    fake = fake_api.fake
    fake.gone_as_status = True
    await fake.put_namespace("ml", {})
    async with watching(fake_api.url) as watch:
        await watches(fake, 1)
        fake.rv += 5  # writes elsewhere, then etcd compacts past the watcher's version
        fake.compact()
        await fake.drop_watches()  # reconnects from its version, which is now too old
        await until(watch, lambda w: w.lists == 2)
        await watches(fake, 2)
        await fake.put_namespace("later", RESTRICTED)
        await until(watch, lambda w: w.cache.labels("later") == RESTRICTED)


async def test_dropped_stream_resumes_from_the_bookmark(fake_api: RunningApi) -> None:
    fake = fake_api.fake
    await fake.put_namespace("ml", {})
    async with watching(fake_api.url) as watch:
        await watches(fake, 1)
        fake.rv += 7  # writes to other resources move the global version
        await fake.bookmark()
        await until(watch, lambda w: w.resource_version == str(fake.rv))
        await fake.drop_watches()
        await watches(fake, 2)
        assert watch.lists == 1, "a dropped stream is resumed, not relisted"
        assert f"resourceVersion={fake.rv}" in fake.requests[-1]
        assert "allowWatchBookmarks=true" in fake.requests[-1]


async def test_refused_credentials_warn_once_and_retry(
    fake_api: RunningApi, caplog: pytest.LogCaptureFixture
) -> None:
    await fake_api.fake.put_namespace("ml", RESTRICTED)
    with caplog.at_level(logging.INFO, logger="test.namespaces"):
        async with watching(fake_api.url, token="wrong") as watch:
            await until(watch, lambda w: w.failures >= 3)
            assert watch.cache.labels("ml") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "401" in warnings[0].error  # type: ignore[attr-defined]
    assert "wrong" not in caplog.text  # the token is never logged


async def test_unreachable_api_server_keeps_labels_unknown(no_leaked_tasks: None) -> None:
    async with watching("http://127.0.0.1:9") as watch:  # discard port: nothing listens
        await until(watch, lambda w: w.failures >= 2)
        assert not watch.cache.synced
        assert watch.cache.labels("default") is None


# --- configuration --------------------------------------------------------------------------


def test_kubeconfig_with_token(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443/', "
        "certificate-authority: ca.crt}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    config, why = find_config({"KUBECONFIG": str(kubeconfig)})
    assert config is not None and why == ""
    assert config.server == "https://127.0.0.1:6443"
    assert config.ca_file == str(tmp_path / "ca.crt")
    assert config.bearer() == "abc"
    assert "abc" not in config.source


def test_kubeconfig_with_exec_plugin_is_no_access(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "current-context: c\nclusters: [{name: k, cluster: {server: 'https://x'}}]\n"
        "users: [{name: u, user: {exec: {command: aws}}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    config, why = find_config({"KUBECONFIG": str(kubeconfig)})
    assert config is None and "plugin" in why


def test_no_configuration_at_all(tmp_path: Path) -> None:
    config, why = find_config({}, home=tmp_path)
    assert config is None and "no in-cluster" in why
    config, why = find_config({"KUBECONFIG": str(tmp_path / "missing")}, home=tmp_path)
    assert config is None and "does not exist" in why


def test_token_file_is_read_on_every_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    config = ClusterConfig(server="https://x", source="test", token_file=str(token))
    assert config.bearer() == "first"
    token.write_text("rotated\n")
    assert config.bearer() == "rotated"
