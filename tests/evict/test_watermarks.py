"""Watermark eviction on a real small filesystem: victims, survivors, accounting."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.eviction.evictor import Eviction
from tests.evict.helpers import (
    MiB,
    fill,
    key_of,
    serve_models,
    until,
    used_ratio,
    verify_blobs,
    visible_models,
)
from tests.servers.faulty import Fault, FaultyServer

pytestmark = pytest.mark.timeout(60)


async def test_fill_past_high_watermark_evicts_lru_down_to_low(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any], faulty: FaultyServer,
        caplog: pytest.LogCaptureFixture) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.95, low=0.9, interval=0.02)
    events: list[Eviction] = []
    agent.evictor.on_evict(events.append)
    uris = serve_models(faulty, "ABCDEF", 6 * MiB)
    for name in "ABCDEF":  # pulled in this order: A is the least recently used ...
        model = await agent.pull(uris[name], pin=name == "C")
        assert model["state"] == "ready", model
    status, _ = await agent.lease(key_of(uris["D"]), "job-1")
    assert status == 201
    a = agent.deps.index.get(key_of(uris["A"]))
    before = a.last_used
    await agent.pull(uris["A"])  # ... until it is asked for again: now B is
    # (D, leased, is in use: its last use moves with the clock at every check, by design)
    assert a.last_used > max(m.last_used for m in agent.deps.index
                             if m is not a and not m.in_use) > before

    agent.evictor.set_limits(high=0.8, low=0.7)
    status, info = await agent.call("GET", "/api/v1/store")
    assert (info["high_watermark"], info["low_watermark"]) == (0.8, 0.7)
    assert used_ratio(fs) < 0.8
    caplog.set_level(logging.INFO, logger="agent.eviction.evictor")
    fill(fs / "filler", int(0.3 * 64 * MiB))  # someone else's data: past the high watermark
    assert used_ratio(fs) > 0.8
    await until(lambda: used_ratio(fs) <= 0.7)
    assert await agent.evictor.check() == 0  # and nothing more goes

    lru = [key_of(uris[n]) for n in "BEFA"]  # C is pinned, D is in use
    gone = [e.key for e in events]
    assert gone == lru[:len(gone)], "victims are the least recently used first"
    assert 0 < len(gone) < len(lru)
    # the last victim was needed: without it the filesystem would be above low
    assert used_ratio(fs) * 64 * MiB + 6 * MiB > 0.7 * 64 * MiB
    assert {e.reason for e in events} == {"watermark"}
    assert all(e.freed_bytes == 6 * MiB for e in events)
    remaining = await agent.keys()
    assert remaining == {key_of(uris[n]) for n in "ABCDEF"} - set(gone)
    assert key_of(uris["C"]) in remaining and key_of(uris["D"]) in remaining
    assert set(visible_models(fs / "store")) == remaining
    verify_blobs(fs / "store")

    lines = [r for r in caplog.records if r.getMessage() == "evicted model"]
    assert [r.__dict__["key"] for r in lines] == gone
    assert all(r.__dict__["reason"] == "watermark" for r in lines)
    assert await agent.metric("modelcache_evictions_total", reason="watermark") == len(gone)
    assert await agent.metric("modelcache_evicted_bytes_total",
                              reason="watermark") == 6 * MiB * len(gone)
    assert await agent.metric("modelcache_store_watermark_ratio", level="high") == 0.8
    assert await agent.metric("modelcache_store_watermark_ratio", level="low") == 0.7


async def test_pinned_in_use_and_pulling_models_survive_when_everything_else_goes(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.95, low=0.9, interval=0.02)
    uris = serve_models(faulty, "ABCDE", 6 * MiB)
    for name in "ABCD":
        assert (await agent.pull(uris[name], pin=name == "A"))["state"] == "ready"
    assert (await agent.lease(key_of(uris["B"]), "notebook"))[0] == 201
    hold = threading.Event()
    faulty.fault("/E.bin", Fault(hold=hold, stall_after=MiB, methods=("GET",)))
    status, pulling = await agent.call("POST", "/api/v1/models", {"uri": uris["E"]})
    assert status == 202
    await until(lambda: faulty.bytes_sent("/E.bin") >= MiB)

    agent.evictor.set_limits(high=0.5, low=0.3)
    fill(fs / "filler", 16 * MiB)
    await until(lambda: {key_of(uris[n]) for n in "CD"}.isdisjoint(
        m.key for m in agent.deps.index))
    await agent.evictor.check()  # once more: still nothing else may go
    keys = {m.key for m in agent.deps.index}
    assert keys == {key_of(uris[n]) for n in "ABE"}, "pinned, in use and pulling stay"
    assert used_ratio(fs) > 0.3  # the low watermark cannot be reached: nothing else goes
    agent.evictor.set_limits(high=0.95, low=0.9)  # once ready, E could go too
    hold.set()
    assert (await agent.wait(pulling["key"]))["state"] == "ready"
    assert set(visible_models(fs / "store")) >= {key_of(uris[n]) for n in "AB"}


async def test_shared_blobs_stay_and_freed_bytes_are_true(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any]) -> None:
    fs = tmpfs(64)
    seed = fs / "seed"
    shared = os.urandom(3 * MiB)
    for name, unique in (("x", 1 * MiB), ("y", 2 * MiB)):
        (seed / name).mkdir(parents=True)
        (seed / name / "shared.bin").write_bytes(shared)
        (seed / name / "own.bin").write_bytes(os.urandom(unique))
    agent = await agent_on(fs / "store", allow_paths=(seed,))
    x = await agent.pull(f"file://{seed}/x")
    y = await agent.pull(f"file://{seed}/y")
    assert x["state"] == y["state"] == "ready"

    status, reply = await agent.call("DELETE", f"/api/v1/models/{x['key']}")
    assert status == 200 and reply["state"] == "evicted"
    assert reply["freed_bytes"] == 1 * MiB  # the shared 3 MiB stay: y still uses them
    assert set(visible_models(fs / "store")) == {y["key"]}
    status, reply = await agent.call("DELETE", f"/api/v1/models/{y['key']}")
    assert reply["freed_bytes"] == 5 * MiB
    assert verify_blobs(fs / "store") == 0
    assert await agent.metric("modelcache_evictions_total", reason="api") == 2
    assert await agent.metric("modelcache_evicted_bytes_total", reason="api") == 6 * MiB
