"""Space reserved before a pull starts: concurrent pulls, quota, inode floor, fail fast."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.eviction.evictor import Eviction
from tests.evict.helpers import (
    DiskWatch,
    MiB,
    key_of,
    serve_models,
    until,
    verify_blobs,
    visible_models,
    waiting_on,
)
from tests.servers.faulty import Fault, FaultyServer

pytestmark = pytest.mark.timeout(60)


async def test_two_pulls_that_together_do_not_fit_one_fails_fast_disk_never_full(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.9, low=0.8)
    uris = serve_models(faulty, "AB", 32 * MiB)
    holds = {n: threading.Event() for n in "AB"}
    for n in "AB":  # the resolve (HEAD) answers; the bytes wait until the test says
        faulty.fault(f"/{n}.bin", Fault(hold=holds[n], methods=("GET",)))
    with DiskWatch(fs) as watch:
        replies = await asyncio.gather(*(agent.call("POST", "/api/v1/models", {"uri": uris[n]})
                                         for n in "AB"))
        assert [status for status, _ in replies] == [202, 202]
        index = agent.deps.index
        await until(lambda: any(m.state == "failed" for m in index))
        assert not any(h.is_set() for h in holds.values()), "it failed before any byte came"
        loser = next(m for m in index if m.state == "failed")
        winner = next(m for m in index if m is not loser)
        assert winner.state == "pulling"
        assert loser.error is not None
        assert f"no room for model {loser.key}: it needs {32 * MiB} bytes" in loser.error
        assert "below its high watermark (90% of" in loser.error
        assert "would free 0" in loser.error
        for h in holds.values():
            h.set()
        assert (await agent.wait(winner.key))["state"] == "ready"
    assert watch.samples > 10
    assert watch.min_free > 0, "the disk never filled"
    assert watch.max_used_ratio <= 0.9
    assert not os.listdir(fs / "store" / "partial")
    assert await agent.metric("modelcache_pull_failures_total", reason="no_space") == 1
    assert set(visible_models(fs / "store")) == {winner.key}


async def test_reservation_evicts_lru_to_fit_then_fails_fast_naming_the_quota(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.99, low=0.9, quota=20 * MiB)
    events: list[Eviction] = []
    agent.evictor.on_evict(events.append)
    uris = serve_models(faulty, "ABC", 10 * MiB)
    faulty.add("/D.bin", os.urandom(21 * MiB))
    for n in "ABC":
        assert (await agent.pull(uris[n]))["state"] == "ready"
    assert [(e.key, e.reason, e.freed_bytes) for e in events] == [
        (key_of(uris["A"]), "quota", 10 * MiB)]
    assert await agent.keys() == {key_of(uris[n]) for n in "BC"}

    model = await agent.pull(faulty.url("/D.bin"))
    assert model["state"] == "failed"
    assert f"it needs {21 * MiB} bytes, the cache quota of {20 * MiB} bytes has 0 left" \
        in model["error"]
    assert f"would free {20 * MiB}" in model["error"]
    assert len(events) == 1, "nothing is evicted for a pull that cannot fit anyway"
    assert faulty.gets("/D.bin") == [], "it failed before downloading"
    assert set(visible_models(fs / "store")) == {key_of(uris[n]) for n in "BC"}
    verify_blobs(fs / "store")


async def test_inode_floor_evicts_models_with_many_files(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any]) -> None:
    fs = tmpfs(64, inodes=1000)
    seed = fs / "seed"
    for m in range(4):
        (seed / f"m{m}").mkdir(parents=True)
        for i in range(60):
            (seed / f"m{m}" / f"f{i}.bin").write_bytes(os.urandom(64))
    agent = await agent_on(fs / "store", high=0.99, low=0.9, allow_paths=(seed,))
    events: list[Eviction] = []
    agent.evictor.on_evict(events.append)
    keys = [(await agent.pull(f"file://{seed}/m{m}"))["key"] for m in range(4)]
    st = os.statvfs(fs)
    floor = st.f_favail / st.f_files + 0.08
    agent.evictor.set_limits(min_free_inodes=floor)
    assert await agent.evictor.check() > 0
    st = os.statvfs(fs)
    assert st.f_favail / st.f_files >= floor
    assert [e.key for e in events] == keys[:len(events)]
    assert {e.reason for e in events} == {"inodes"}
    assert 0 < len(events) < 4


async def test_no_eviction_until_in_use_is_known(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", standalone=False, high=0.99, low=0.9,
                           quota=20 * MiB)
    uris = serve_models(faulty, "ABC", 10 * MiB)
    for n in "AB":
        assert (await agent.pull(uris[n]))["state"] == "ready"
    status, reply = await agent.call("DELETE", f"/api/v1/models/{key_of(uris['A'])}")
    assert status == 409 and "does not know yet" in reply["error"]
    agent.evictor.set_limits(quota_bytes=15 * MiB)
    assert await agent.evictor.check() == 0  # over the quota, but in-use is not known

    known = agent.evictor.in_use_known
    parked = waiting_on(known)  # the evictor's own loop waits for it too
    status, model = await agent.call("POST", "/api/v1/models", {"uri": uris["C"]})
    await until(lambda: waiting_on(known) > parked)  # the pull's reservation waits to evict
    assert agent.deps.index.get(model["key"]).state == "pulling"  # waits to evict
    assert faulty.gets("/C.bin") == []
    agent.evictor.set_limits(quota_bytes=20 * MiB)
    agent.evictor.in_use_known.set()  # what the cluster side does once its informer synced
    assert (await agent.wait(model["key"]))["state"] == "ready"
    assert await agent.keys() == {key_of(uris[n]) for n in "BC"}
