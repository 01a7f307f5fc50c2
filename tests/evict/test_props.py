"""A hypothesis state machine over pull / use / release / evict / delete / gc / restart.

A whole agent core (store, index, puller with the ``file://`` source, evictor and leases)
runs on a real tmpfs; models share content, so evictions meet shared blobs. After every
step:

- a model that is in use (a lease) or pinned is never removed by eviction;
- every visible model (a manifest on disk) is complete and verified, and it is exactly the
  set of ready models in the index;
- the store's bytes are the sum of its distinct blobs, every blob a visible model needs is
  there, and after garbage collection no other blob is.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from agent.auth import TokenFileAuth
from agent.eviction.evictor import Evictor
from agent.eviction.leases import Leases
from agent.index import READY, Index
from agent.pull.puller import Puller
from agent.settings import AgentSettings, EgressSettings, FetchSettings, StoreSettings
from agent.store.local import Store
from common.errors import Conflict, NotFound
from common.reference import parse
from tests.evict.helpers import blob_digests, visible_models
from tests.servers.agent import InProcessAgent

pytestmark = pytest.mark.timeout(300)
MODELS = 6
OWNERS = ("alice", "bob")


def make_sources(root: Path) -> list[str]:
    """Six models of one to three files drawn from eight contents (shared blobs)."""
    rng = random.Random(4)
    contents = [rng.randbytes(rng.choice((0, 100, 3000, 20_000, 70_000))) for _ in range(8)]
    uris = []
    for m in range(MODELS):
        d = root / f"m{m}"
        d.mkdir(parents=True)
        for j, c in enumerate(rng.sample(range(len(contents)), rng.randint(1, 3))):
            (d / f"f{j}.bin").write_bytes(contents[c])
        uris.append(f"file://{d}")
    return uris


class Core:
    """The agent's core on one store: the composition root's agent, not served (the one
    harness, :class:`~tests.servers.agent.InProcessAgent`); orphans are collected at once."""

    def __init__(self, root: Path, seed: Path) -> None:
        self.settings = AgentSettings(
            store=StoreSettings(path=root, high_watermark=0.99, low_watermark=0.98),
            egress=EgressSettings(allow_paths=(seed,)), fetch=FetchSettings(max_files=2))
        self.agent = InProcessAgent(self.settings, auth=TokenFileAuth("props-token-0123456"),
                                    serve=False)

    async def start(self) -> None:
        await self.agent.start()
        self.evictor.orphan_grace = 0.0

    async def stop(self) -> None:
        await self.agent.close()

    @property
    def store(self) -> Store:
        return self.agent.deps.store  # type: ignore[no-any-return]

    @property
    def index(self) -> Index:
        return self.agent.index  # type: ignore[no-any-return]

    @property
    def evictor(self) -> Evictor:
        return self.agent.evictor  # type: ignore[no-any-return]

    @property
    def puller(self) -> Puller:
        return self.agent.deps.puller  # type: ignore[no-any-return]

    @property
    def leases(self) -> Leases:
        return self.agent.deps.leases  # type: ignore[no-any-return]


class EvictionMachine(RuleBasedStateMachine):
    def __init__(self, base: Path, uris: list[str], seed: Path) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = base / f"store-{os.urandom(4).hex()}"
        self.uris, self.seed = uris, seed
        self.keys = [parse(u).key for u in uris]
        self.core = Core(self.root, seed)
        self.run(self.core.start())
        self.pinned: set[str] = set()
        self.leases: dict[str, set[str]] = {}

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.run(self.core.stop())
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def protected(self) -> set[str]:
        return self.pinned | {k for k, owners in self.leases.items() if owners}

    # --- rules ---------------------------------------------------------------------------

    @rule(m=st.integers(0, MODELS - 1), pin=st.booleans())
    def pull(self, m: int, pin: bool) -> None:
        async def go() -> None:
            model = await self.core.puller.ensure(parse(self.uris[m]), pin=pin)
            if model.task is not None:
                await asyncio.gather(model.task, return_exceptions=True)
            assert model.state == READY, model.error

        self.run(go())
        if pin:
            self.pinned.add(self.keys[m])

    @rule(m=st.integers(0, MODELS - 1), owner=st.sampled_from(OWNERS))
    def use(self, m: int, owner: str) -> None:
        key = self.keys[m]
        try:
            self.run(self.core.leases.take(key, owner, 3600))
        except NotFound:
            assert self.core.index.get(key) is None
            return
        self.leases.setdefault(key, set()).add(owner)

    @rule(m=st.integers(0, MODELS - 1), owner=st.sampled_from(OWNERS))
    def release(self, m: int, owner: str) -> None:
        key = self.keys[m]
        try:
            self.run(self.core.leases.release(key, owner))
        except NotFound:
            assert owner not in self.leases.get(key, set())
            return
        self.leases[key].discard(owner)

    @rule(quota=st.integers(1, 300_000))
    def evict(self, quota: int) -> None:
        before = {m.key for m in self.core.index}
        evictor = self.core.evictor
        evictor.set_limits(quota_bytes=quota)
        self.run(evictor.check())
        evictor.set_limits(quota_bytes=None)
        gone = before - {m.key for m in self.core.index}
        assert not gone & self.protected(), "a model in use or pinned was evicted"

    @rule(m=st.integers(0, MODELS - 1), force=st.booleans())
    def delete(self, m: int, force: bool) -> None:
        key = self.keys[m]
        try:
            self.run(self.core.evictor.remove(key, force=force))
        except NotFound:
            assert self.core.index.get(key) is None
            return
        except Conflict:
            assert not force and key in {k for k, o in self.leases.items() if o}
            return
        assert force or not self.leases.get(key)
        self.pinned.discard(key)
        self.leases.pop(key, None)

    @rule()
    def gc(self) -> None:
        before = {m.key for m in self.core.index}
        self.run(self.core.evictor.collect())
        assert not (before - {m.key for m in self.core.index}) & self.protected()
        referenced = {f.blake3 for m in visible_models(self.root).values() for f in m.files}
        assert set(blob_digests(self.root)) == referenced, "gc leaves exactly what is used"

    @rule()
    def restart(self) -> None:
        self.run(self.core.stop())
        self.core = Core(self.root, self.seed)
        self.run(self.core.start())
        for key in self.protected():
            model = self.core.index.get(key)
            assert model is not None, "a protected model survives a restart"
            assert model.pinned or model.in_use, "and is known to be protected again"

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def protected_models_stay(self) -> None:
        for key in self.protected():
            model = self.core.index.get(key)
            assert model is not None and model.state == READY

    @invariant()
    def visible_models_are_complete_and_the_index_agrees(self) -> None:
        visible = visible_models(self.root)
        ready = {m.key for m in self.core.index if m.state == READY}
        assert set(visible) == ready

    @invariant()
    def bytes_are_the_sum_of_distinct_blobs(self) -> None:
        on_disk = blob_digests(self.root)
        assert self.core.store.cache_bytes() == sum(on_disk.values())
        assert self.core.store.usage().cache_bytes == sum(on_disk.values())
        needed = {f.blake3 for m in visible_models(self.root).values() for f in m.files}
        assert needed <= set(on_disk)


@pytest.mark.slow
def test_eviction_invariants(tmpfs: Callable[..., Path]) -> None:
    fs = tmpfs(64)
    uris = make_sources(fs / "seed")
    run_state_machine_as_test(
        lambda: EvictionMachine(fs, uris, fs / "seed"),
        settings=settings(max_examples=30, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
