"""The counts controller and its Lease: CachedModels' counts summed from the NodeCaches
through the fake apiserver (real client, the webhook's own RBAC), writes held to one per
interval, and one replica leading at a time, handing over at once on shutdown and after
the Lease's duration when its holder dies."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_webhook_main import env_for, running, serve_args
from webhook_testkit import WEBHOOK_TOKEN, CertFiles

from common.kube.client import KubeClient, connect
from common.kube.lease import LeaderElection, LeaseSettings
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import FAST
from tests.kubeapi.objects import cached_model
from tests.kubeapi.server import load_crds
from webhook.counts import Counts

CM = "cachedmodels"
QUICK = LeaseSettings(duration=1.0, renew_deadline=0.6, retry=0.05)


@pytest.fixture
async def kube(kube_api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[KubeClient]:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "webhook.kc", token=WEBHOOK_TOKEN)
    async with await connect(str(kubeconfig), FAST) as client:
        yield client


def report(api: FakeKubeApi, node: str, *entries: tuple[str, str, str]) -> None:
    """Write ``node``'s NodeCache, as its agent would: (name, uid, state) of default's."""
    models = [{"namespace": "default", "name": n, "uid": u, "state": s} for n, u, s in entries]
    if api.cluster.exists("nodecaches", node):
        api.cluster.patch("nodecaches", node, {"status": {"models": models}})
    else:
        api.cluster.create("nodecaches", {"metadata": {"name": node},
                                          "status": {"models": models}})


def shown(api: FakeKubeApi, name: str) -> dict[str, Any]:
    return dict(api.cluster.get(CM, name, "default").get("status") or {})


async def test_counts_sum_the_node_caches(kube_api: FakeKubeApi, kube: KubeClient):
    c = kube_api.cluster
    a = c.create(CM, cached_model("a"), "default")["metadata"]["uid"]
    b = c.create(CM, cached_model("b"), "default")["metadata"]["uid"]
    report(kube_api, "n1", ("a", a, "ready"), ("b", b, "pulling"))
    report(kube_api, "n2", ("a", a, "failed"), ("b", "an-older-b", "ready"))
    counts = Counts(kube, interval=0.0)
    task = asyncio.create_task(counts.run())
    try:
        async with asyncio.timeout(10):
            await c.wait_until(lambda: shown(kube_api, "a") == {
                "ready": 1, "pulling": 0, "failed": 1})
            # an entry for another CachedModel of the same name (re-created) is not counted
            await c.wait_until(lambda: shown(kube_api, "b") == {
                "ready": 0, "pulling": 1, "failed": 0})
            report(kube_api, "n1", ("a", a, "ready"), ("b", b, "ready"))
            await c.wait_until(lambda: shown(kube_api, "b")["ready"] == 1)
            c.delete("nodecaches", "n2")  # its node went (the garbage collector)
            await c.wait_until(lambda: shown(kube_api, "a")["failed"] == 0)
            c.create(CM, cached_model("c"), "default")  # no node reports on it: zeros
            await c.wait_until(lambda: shown(kube_api, "c") == {
                "ready": 0, "pulling": 0, "failed": 0})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert shown(kube_api, "a") == {"ready": 1, "pulling": 0, "failed": 0}
    writes = kube_api.count("patch", f"{CM}/status")
    assert writes == counts.writes == 5  # a, b, b again, a again, c: none when none changed


async def test_counts_are_written_at_most_once_per_interval(kube_api: FakeKubeApi,
                                                            kube: KubeClient):
    c = kube_api.cluster
    uid = c.create(CM, cached_model("m"), "default")["metadata"]["uid"]
    clock = [100.0]
    counts = Counts(kube, interval=5.0, clock=lambda: clock[0])
    task = asyncio.create_task(counts.watch())
    try:
        async with asyncio.timeout(10):
            await counts.cached_models.synced.wait()
            for i, state in enumerate(["pulling", "ready", "ready", "failed"]):
                report(kube_api, f"n{i}", ("m", uid, state))
                await counts.node_caches.wait_until(
                    lambda i=i: f"n{i}" in counts.node_caches.store)
                if i == 0:
                    counts._dirty.add("default/m")  # (as the writer does once synced)
                    assert await counts.flush() is None  # written at once
                else:
                    assert await counts.flush() == 105.0  # within the interval: later
            assert shown(kube_api, "m") == {"ready": 0, "pulling": 1, "failed": 0}
            clock[0] = 105.0
            await counts.cached_models.wait_until(
                lambda: (counts.cached_models.store["default/m"].get("status") or {})
                .get("pulling") == 1)
            assert await counts.flush() is None
            assert shown(kube_api, "m") == {"ready": 2, "pulling": 1, "failed": 1}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert counts.writes == 2


def former_release() -> dict[str, Any]:
    """The CachedModel CRD as the release before NodeCaches had it: every node's entry in
    ``status.nodes``, beside the counts."""
    crd = copy.deepcopy(next(d for d in load_crds() if d["spec"]["names"]["plural"] == CM))
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    status["properties"]["nodes"] = {"type": "object", "additionalProperties": {
        "type": "object", "required": ["state"], "properties": {
            "state": {"type": "string", "enum": ["pulling", "ready", "failed", "evicted"]},
            "revision": {"type": "string"}, "message": {"type": "string"}}}}
    return crd


async def test_an_upgrade_from_per_node_status_lists(kube_api: FakeKubeApi, kube: KubeClient):
    """A CachedModel written by the former release (per-node entries, counts its agents
    computed): once the new CRD is applied the entries are no longer served, and the counts
    are the NodeCaches' as soon as the counts controller runs; the entries leave etcd at
    that first write."""
    c = kube_api.cluster
    c.install_crd(former_release())
    uid = c.create(CM, cached_model("m"), "default")["metadata"]["uid"]
    c.patch(CM, "m", {"status": {"ready": 2, "pulling": 0, "failed": 1, "nodes": {
        "n1": {"state": "ready", "revision": "r1"}, "n2": {"state": "ready", "revision": "r1"},
        "n3": {"state": "failed", "message": "hub said 429"}}}}, "default",
        subresource="status")
    assert set(shown(kube_api, "m")["nodes"]) == {"n1", "n2", "n3"}
    c.install_crd(next(d for d in load_crds() if d["spec"]["names"]["plural"] == CM))
    assert shown(kube_api, "m") == {"ready": 2, "pulling": 0, "failed": 1}  # pruned on read
    stored = c.objects[c.resource(CM).key]
    assert any("nodes" in (o.get("status") or {}) for o in stored.values())  # still in etcd
    # n1's agent has restarted on the new release; n2's and n3's have not yet
    report(kube_api, "n1", ("m", uid, "ready"))
    counts = Counts(kube, interval=0.0)
    task = asyncio.create_task(counts.run())
    try:
        async with asyncio.timeout(10):
            await c.wait_until(lambda: shown(kube_api, "m") == {
                "ready": 1, "pulling": 0, "failed": 0})
            report(kube_api, "n3", ("m", uid, "pulling"))  # n3's agent restarted and retries
            await c.wait_until(lambda: shown(kube_api, "m") == {
                "ready": 1, "pulling": 1, "failed": 0})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not any("nodes" in (o.get("status") or {}) for o in stored.values())


async def test_one_leader_at_a_time_and_a_quick_hand_over(kube_api: FakeKubeApi,
                                                          kube: KubeClient):
    leading: list[str] = []

    def candidate(name: str) -> tuple[LeaderElection, asyncio.Task[None]]:
        election = LeaderElection(kube, "modelcache", "modelcache-counts", name, QUICK)

        async def lead() -> None:
            leading.append(name)
            try:
                await asyncio.Event().wait()
            finally:
                leading.remove(name)

        return election, asyncio.create_task(election.run(lead))

    first, first_task = candidate("a")
    async with asyncio.timeout(5):
        await first.leading.wait()
        while leading != ["a"]:
            await asyncio.sleep(0)
    second, second_task = candidate("b")
    try:
        # "b" keeps trying and never leads while "a" renews
        await kube_api.cluster.wait_until(lambda: kube_api.count("get", "leases") > 20)
        assert leading == ["a"] and not second.leading.is_set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_task.cancel()  # shut down: "a" releases the Lease
        with contextlib.suppress(asyncio.CancelledError):
            await first_task
        async with asyncio.timeout(5):
            await second.leading.wait()
        assert loop.time() - started < 0.5, "released: no waiting for the Lease to expire"
        while leading != ["b"]:  # its work starts at the next turn of the loop
            await asyncio.sleep(0)
        lease = kube_api.cluster.get("leases", "modelcache-counts", "modelcache")
        assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)
    finally:
        second_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second_task


async def test_a_dead_holders_lease_is_taken_after_its_duration(kube_api: FakeKubeApi,
                                                                kube: KubeClient):
    kube_api.cluster.create("leases", {"metadata": {"name": "modelcache-counts"}, "spec": {
        "holderIdentity": "crashed", "leaseDurationSeconds": 1,
        "renewTime": "2020-01-01T00:00:00.000000Z"}}, "modelcache")
    election = LeaderElection(kube, "modelcache", "modelcache-counts", "b", QUICK)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(election.run(asyncio.Event().wait))
    try:
        async with asyncio.timeout(5):
            await election.leading.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # judged by its own clock from when it first saw the record, not by renewTime
    assert 1.0 <= loop.time() - started < 2.0


@pytest.mark.slow
async def test_two_webhook_processes_one_counts(
        kube_api: FakeKubeApi, cert_files: CertFiles, client_ssl: ssl.SSLContext,
        tmp_path: Path) -> None:
    """Two real webhook processes under their RBAC: one holds the Lease and writes the
    counts; on SIGTERM it releases it and the other takes over."""
    c = kube_api.cluster
    uid = c.create(CM, cached_model("m"), "default")["metadata"]["uid"]
    report(kube_api, "n1", ("m", uid, "ready"))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig", token=WEBHOOK_TOKEN)
    env = env_for(kubeconfig)
    async with running(serve_args(cert_files, "--counts-interval", "0"), env) as one, \
            running(serve_args(cert_files, "--counts-interval", "0"), env) as two:
        async with asyncio.timeout(20):
            await c.wait_until(lambda: shown(kube_api, "m").get("ready") == 1)
        leader = next(p for p in (one, two) if any(e["msg"] == "leading" for e in p.logs))
        other = two if leader is one else one
        leader.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(leader.proc.wait(), 15)
        await other.wait_log("leading")
        report(kube_api, "n2", ("m", uid, "ready"))
        async with asyncio.timeout(20):
            await c.wait_until(lambda: shown(kube_api, "m").get("ready") == 2)
    assert WEBHOOK_TOKEN not in json.dumps(one.logs + two.logs)
