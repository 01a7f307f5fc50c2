"""The admin API of eviction: leases, DELETE, gc and its CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main as cli
from tests.evict.helpers import (
    TOKEN,
    MiB,
    blob_digests,
    key_of,
    serve_models,
    until,
    visible_models,
)
from tests.servers.faulty import Fault, FaultyServer

pytestmark = pytest.mark.timeout(60)


async def test_leases_hold_models_in_use_across_a_restart_until_they_expire(
        tmp_path: Path, agent_on: Callable[..., Any], faulty: FaultyServer) -> None:
    store = tmp_path / "store"
    agent = await agent_on(store)
    uris = serve_models(faulty, "AB", 1000)
    a, b = key_of(uris["A"]), key_of(uris["B"])
    for n in "AB":
        await agent.pull(uris[n])

    status, lease = await agent.lease(a, "job-7", ttl=3600)
    assert status == 201 and lease["owner"] == "job-7" and lease["expires"].endswith("Z")
    assert (await agent.lease(b, "short", ttl=0.3))[0] == 201
    expired = time.time() + 0.3
    assert (await agent.wait(a))["in_use"]
    status, reply = await agent.call("DELETE", f"/api/v1/models/{a}")
    assert status == 409 and "lease:job-7" in reply["error"]
    saved = json.loads((store / "leases.json").read_text())
    assert set(saved["leases"]) == {a, b}

    await agent.close()
    await until(lambda: time.time() > expired)
    agent = await agent_on(store)
    assert (await agent.wait(a))["in_use"], "the lease is known again from disk"
    assert not (await agent.wait(b))["in_use"], "an expired lease is ignored"
    assert agent.deps.index.get(a).holders.keys() == {"lease:job-7"}

    assert (await agent.call("DELETE", f"/api/v1/models/{a}/leases/job-7"))[0] == 200
    assert not (await agent.wait(a))["in_use"]
    assert json.loads((store / "leases.json").read_text())["leases"] == {}
    status, reply = await agent.call("DELETE", f"/api/v1/models/{a}/leases/job-7")
    assert status == 404


@pytest.mark.parametrize("body, status", [
    ({"owner": "x", "ttl_seconds": 0}, 400),
    ({"owner": "x", "ttl_seconds": "10"}, 400),
    ({"owner": "x", "ttl_seconds": True}, 400),
    ({"owner": "", "ttl_seconds": 10}, 400),
    ({"owner": "a/b", "ttl_seconds": 10}, 400),
    ({"owner": "x", "ttl_seconds": 10, "pin": True}, 400),
    ({"owner": "x"}, 400),
])
async def test_lease_requests_are_checked(tmp_path: Path, agent_on: Callable[..., Any],
                                          faulty: FaultyServer, body: Any, status: int) -> None:
    agent = await agent_on(tmp_path / "store")
    uri = serve_models(faulty, "A", 100)["A"]
    await agent.pull(uri)
    assert (await agent.call("POST", f"/api/v1/models/{key_of(uri)}/leases", body))[0] == status


async def test_lease_writes_need_the_token_and_a_known_model(
        tmp_path: Path, agent_on: Callable[..., Any], faulty: FaultyServer) -> None:
    agent = await agent_on(tmp_path / "store")
    uri = serve_models(faulty, "A", 100)["A"]
    await agent.pull(uri)
    body = {"owner": "x", "ttl_seconds": 10}
    path = f"/api/v1/models/{key_of(uri)}/leases"
    assert (await agent.call("POST", path, body, token=None))[0] == 401
    assert (await agent.call("DELETE", path + "/x", token=None))[0] == 401
    assert (await agent.call("POST", "/api/v1/models/" + "0" * 24 + "/leases", body))[0] == 404


async def test_delete_stops_a_pull_and_removes_what_it_wrote(
        tmp_path: Path, agent_on: Callable[..., Any], faulty: FaultyServer) -> None:
    agent = await agent_on(tmp_path / "store")
    uri = serve_models(faulty, "A", 8 * MiB)["A"]
    hold = threading.Event()
    faulty.fault("/A.bin", Fault(hold=hold, stall_after=MiB, methods=("GET",)))
    status, model = await agent.call("POST", "/api/v1/models", {"uri": uri})
    await until(lambda: faulty.bytes_sent("/A.bin") >= MiB)
    status, reply = await agent.call("DELETE", f"/api/v1/models/{model['key']}")
    hold.set()
    assert status == 200 and reply["state"] == "evicted"
    assert await agent.keys() == set()
    store = tmp_path / "store"
    assert not os.listdir(store / "partial") and not os.listdir(store / "pulls")


async def test_forced_delete_of_a_model_in_use_ends_its_leases(
        tmp_path: Path, agent_on: Callable[..., Any], faulty: FaultyServer) -> None:
    agent = await agent_on(tmp_path / "store")
    uri = serve_models(faulty, "A", 1000)["A"]
    key = (await agent.pull(uri))["key"]
    await agent.lease(key, "svc")
    status, reply = await agent.call("DELETE", f"/api/v1/models/{key}?force=true")
    assert status == 200 and reply["freed_bytes"] == 1000
    assert json.loads((tmp_path / "store" / "leases.json").read_text())["leases"] == {}
    await agent.pull(uri)
    assert not (await agent.wait(key))["in_use"], "a new copy starts without the old leases"


async def test_gc_drops_older_trees_and_unreferenced_blobs_then_evicts_to_low(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.95, low=0.9, refresh_interval=0.0)
    uris = serve_models(faulty, "ABC", 4 * MiB)
    for n in "ABC":
        await agent.pull(uris[n])
    old = blob_digests(fs / "store")
    faulty.add("/A.bin", os.urandom(4 * MiB))  # a new revision of A
    await agent.pull(uris["A"])  # ready: a hit that starts a refresh in the background
    a = key_of(uris["A"])
    await until(lambda: not agent.deps.index.get(a).refreshing)
    assert agent.deps.store.manifest(a).previous, "the older tree is kept until gc"

    token = fs / "token"
    token.write_text(TOKEN)
    freed = await asyncio.to_thread(gc_cli, agent.url, token)
    assert freed == 0, "the old revision's blob is too fresh to be garbage yet"
    agent.evictor.orphan_grace = 0.0
    agent.evictor.set_limits(high=0.95, low=0.15)
    freed = await asyncio.to_thread(gc_cli, agent.url, token)
    # A's older tree (4 MiB), then B, the least recently used, to get under 15%
    assert freed == 8 * MiB
    assert await agent.keys() == {a, key_of(uris["C"])}
    assert not agent.deps.store.manifest(a).previous
    assert len(set(old) - set(blob_digests(fs / "store"))) == 2
    assert set(visible_models(fs / "store")) == {a, key_of(uris["C"])}


def gc_cli(url: str, token: Path) -> int:
    """``modelcache gc --json`` against the agent; returns the bytes it reports freed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["gc", "--agent", url, "--token-file", str(token), "--json"]) == 0
    return int(json.loads(out.getvalue())["freed_bytes"])


async def test_expired_leases_are_pruned(tmp_path: Path, agent_on: Callable[..., Any],
                                         faulty: FaultyServer) -> None:
    agent = await agent_on(tmp_path / "store")
    uris = serve_models(faulty, "AB", 100)
    a, b = key_of(uris["A"]), key_of(uris["B"])
    for n in "AB":
        await agent.pull(uris[n])
    for key in (a, b):
        assert (await agent.lease(key, "batch", ttl=0.2))[0] == 201
    expired = time.time() + 0.2  # both leases are over by then
    agent.deps.index.get(b).holders.clear()  # e.g. a new copy of the model
    await until(lambda: time.time() > expired)
    await agent.deps.leases.expire()
    assert agent.deps.leases.table == {}
    assert agent.deps.index.get(a).holders == {}
    assert json.loads((tmp_path / "store" / "leases.json").read_text())["leases"] == {}
