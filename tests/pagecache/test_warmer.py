"""Page-cache warming in a real agent (the composition root's ``build`` and ``serve``):
started by an ensure through the admin API, of a ready model or of one still pulling;
skipped when resident or disabled; stopped at the memory floor; the API answers while it
reads (``/healthz`` latency measured)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.pagecache.memory import MemoryProbe
from agent.pagecache.resident import resident_bytes
from agent.pagecache.warmer import WARMED, Warming
from agent.settings import EgressSettings, PageCacheSettings
from tests.pagecache.conftest import evict, write_cold
from tests.servers.agent import InProcessAgent, agent_settings
from tests.servers.faulty import Fault, FaultyServer

MiB = 1024 * 1024
FAST = PageCacheSettings(rate_bytes=0, chunk_bytes=4 * MiB)


def model_dir(root: Path, sizes: dict[str, int]) -> Path:
    """A model directory on the disk: ``sizes`` by file name, random bytes."""
    for name, size in sizes.items():
        write_cold(root / name, size)
    return root


@asynccontextmanager
async def running(tmp_path: Path, page_cache: PageCacheSettings = FAST, **overrides: Any
                  ) -> AsyncIterator[InProcessAgent]:
    settings = agent_settings(tmp_path, egress=EgressSettings(
        allow_hosts=("127.0.0.1",), allow_paths=(tmp_path / "src",)),
        page_cache=page_cache, **overrides)
    async with InProcessAgent(settings) as agent:
        yield agent


class Outcomes:
    """The warmings an agent finishes, as they finish."""

    def __init__(self, agent: InProcessAgent) -> None:
        self.queue: asyncio.Queue[Warming] = asyncio.Queue()
        agent.deps.warmer.on_done(self.queue.put_nowait)

    async def next(self, seconds: float = 30.0) -> Warming:
        async with asyncio.timeout(seconds):
            return await self.queue.get()


def tree_files(agent: InProcessAgent, key: str) -> list[Path]:
    model = agent.deps.index.get(key)
    tree = agent.deps.store.models / key / model.manifest.tree
    return [tree / f.path for f in model.manifest.files]


def cold_tree(agent: InProcessAgent, key: str) -> list[Path]:
    files = tree_files(agent, key)
    for f in files:
        evict(f)
    return files


async def ensure(agent: InProcessAgent, uri: str) -> dict[str, Any]:
    async with agent.client() as client:
        return dict(await client.ensure(uri, warm=True))  # as the init container asks


def skipped(agent: InProcessAgent, reason: str) -> float:
    value = agent.deps.metrics.registry.get_sample_value(
        "modelcache_pagecache_warmings_skipped_total", {"reason": reason})
    return float(value or 0)


def sample(agent: InProcessAgent, name: str) -> float:
    return float(agent.deps.metrics.registry.get_sample_value(name) or 0)


async def test_an_ensure_of_a_ready_model_warms_it(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src" / "m", {"model-00001.safetensors": 24 * MiB,
                                             "model-00002.safetensors": 8 * MiB + 7,
                                             "config.json": 300})
    async with running(tmp_path) as agent:
        outcomes = Outcomes(agent)
        first = await ensure(agent, f"file://{src}")
        key = first["key"]
        assert (await agent.deps.index.wait(key, 30)).state == "ready"
        assert (await outcomes.next()).outcome in (WARMED, "resident")  # the pull's ensure
        files = cold_tree(agent, key)
        assert all(resident_bytes(f)[0] < resident_bytes(f)[1] for f in files)
        warmed_before = sample(agent, "modelcache_pagecache_warmed_bytes_total")

        await ensure(agent, f"file://{src}")  # what an init container does
        done = await outcomes.next()
        assert (done.key, done.trigger, done.outcome) == (key, "ensure", WARMED)
        for f in files:
            assert resident_bytes(f)[0] == f.stat().st_size
        warmed = sample(agent, "modelcache_pagecache_warmed_bytes_total") - warmed_before
        assert warmed == done.result.warmed_bytes >= 32 * MiB
        assert warmed <= 32 * MiB + 7 + 300 + 2 * 4096  # partial last pages

        await ensure(agent, f"file://{src}")  # resident now: nothing to read
        again = await outcomes.next()
        assert again.outcome == "resident" and again.result.warmed_bytes == 0
        assert skipped(agent, "resident") >= 1


async def test_an_operators_pull_fills_the_disk_not_the_page_cache(tmp_path: Path) -> None:
    # `modelcache pull` (no pod is about to load it) must not spend the node's memory or
    # disk bandwidth beside other pulls: only an ensure that asks for it warms
    src = model_dir(tmp_path / "src" / "m", {"model.safetensors": 8 * MiB})
    async with running(tmp_path) as agent:
        outcomes = Outcomes(agent)
        async with agent.client() as client:
            key = (await client.ensure(f"file://{src}"))["key"]
        assert (await agent.deps.index.wait(key, 30)).state == "ready"
        assert agent.deps.warmer.current(key) is None
        await ensure(agent, f"file://{src}")  # now a pod's init container asks
        assert (await outcomes.next()).key == key
        status, reply = await agent.call("POST", "/api/v1/models",
                                         {"uri": f"file://{src}", "warm": "yes"})
        assert status == 400 and '"warm" must be true or false' in reply["error"]


async def test_an_ensure_of_a_model_still_pulling_warms_it_once_ready(
        tmp_path: Path, faulty: FaultyServer) -> None:
    (tmp_path / "src").mkdir()
    faulty.add("/w.safetensors", bytes(range(256)) * (8 * MiB // 256))
    release = threading.Event()
    faulty.always("/w.safetensors", Fault(hold=release))
    try:
        async with running(tmp_path) as agent:
            outcomes = Outcomes(agent)
            model = await ensure(agent, faulty.url("/w.safetensors"))
            assert model["state"] == "pulling"
            waiting = agent.deps.warmer.current(model["key"])
            assert waiting is not None and waiting.outcome is None
            assert agent.deps.warmer.want(model["key"]) is waiting  # joined, not a second
            release.set()
            done = await outcomes.next()
            assert done is waiting and done.outcome in (WARMED, "resident")
            for f in tree_files(agent, model["key"]):
                assert resident_bytes(f)[0] == f.stat().st_size
    finally:
        release.set()


async def test_a_model_that_fails_to_pull_is_not_warmed(tmp_path: Path,
                                                        faulty: FaultyServer) -> None:
    (tmp_path / "src").mkdir()
    async with running(tmp_path, sources=replace(agent_settings(tmp_path).sources,
                                                 control_retries=1)) as agent:
        outcomes = Outcomes(agent)
        model = await ensure(agent, faulty.url("/missing.safetensors"))
        done = await outcomes.next()
        assert (done.key, done.outcome) == (model["key"], "unavailable")
        assert skipped(agent, "unavailable") == 1


async def test_disabled_by_config(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src" / "m", {"w.bin": 4 * MiB})
    async with running(tmp_path, replace(FAST, enabled=False)) as agent:
        model = await ensure(agent, f"file://{src}")
        assert agent.deps.warmer.current(model["key"]) is None
        assert skipped(agent, "disabled") == 1


async def test_stops_at_the_memory_floor(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src" / "m", {"w.bin": 128 * MiB})
    # a node of 1 GiB with 500 MiB available (procfs as the kernel lays it out, in the
    # test's directory): a floor of 45% (460.8 MiB) leaves 39.2 MiB to warm
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/\n")
    (proc / "meminfo").write_text("MemTotal:        1048576 kB\nMemFree:          409600 kB\n"
                                  "MemAvailable:     512000 kB\n")
    async with running(tmp_path, replace(FAST, min_available=0.45)) as agent:
        outcomes = Outcomes(agent)
        model = await ensure(agent, f"file://{src}")
        assert (await agent.deps.index.wait(model["key"], 30)).state == "ready"
        await outcomes.next()
        cold_tree(agent, model["key"])
        agent.deps.warmer.probe = MemoryProbe(proc, tmp_path / "no-cgroup")
        await ensure(agent, f"file://{src}")
        done = await outcomes.next()
        assert done.key == model["key"] and done.outcome == "memory"
        headroom = 512000 * 1024 - int(0.45 * 1048576 * 1024)
        assert headroom - 4 * MiB < done.result.warmed_bytes <= headroom
        assert resident_bytes(tree_files(agent, model["key"])[0])[0] < 128 * MiB
        assert skipped(agent, "memory") == 1


@pytest.mark.slow
async def test_healthz_answers_while_a_model_is_read(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src" / "m", {"w.bin": 160 * MiB})
    paced = replace(FAST, rate_bytes=64 * MiB)  # ~2.5 s of reading
    async with running(tmp_path, paced) as agent, aiohttp.ClientSession(agent.url) as http:
        outcomes = Outcomes(agent)
        model = await ensure(agent, f"file://{src}")
        key = model["key"]
        assert (await agent.deps.index.wait(key, 60)).state == "ready"
        await outcomes.next()
        cold_tree(agent, key)
        await ensure(agent, f"file://{src}")
        warming = agent.deps.warmer.current(key)
        assert warming is not None and warming.task is not None
        latencies: list[float] = []
        while not warming.task.done():
            started = time.perf_counter()
            async with http.get("/healthz") as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - started)
        assert (await outcomes.next()).outcome == WARMED
        assert len(latencies) >= 50, "the warming ended before it could be measured"
        assert statistics.median(latencies) < 0.05, latencies
        assert max(latencies) < 0.25, latencies
