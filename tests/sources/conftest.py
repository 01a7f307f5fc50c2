"""The agent's pull pipeline in-process (Store + Fetcher + Puller + every source), for the
source tests: real servers on loopback, the real engine, nothing mocked.

``pipeline(...)`` builds one with settings suited to small test models: tiny segments (so
the parallel ranged reads really run), short backoffs, loopback allowed (127.0.0.1 for the
servers, 127.0.0.2 for the hub's CDN), and the source endpoints the test gives.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent.egress import Egress
from agent.eviction.evictor import Evictor
from agent.eviction.leases import Leases
from agent.eviction.ledger import Ledger
from agent.eviction.reservations import Reservations
from agent.eviction.usage import Usage
from agent.fetch.engine import Fetcher
from agent.index import READY, Index, Model
from agent.metrics import Metrics
from agent.pull.puller import Puller
from agent.settings import (
    AgentSettings,
    EgressSettings,
    FetchSettings,
    SourceSettings,
    StoreSettings,
)
from agent.sources.base import Source
from agent.sources.catalog import build_sources
from agent.store.local import Store
from agent.store.recovery import recover
from common.reference import parse

LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.2")
TEST_FETCH = FetchSettings(
    connections_per_file=3, segment_min_bytes=64 * 1024, backoff_base=0.01, backoff_max=2.0,
    retries=4, connect_timeout=5.0, read_timeout=20.0,
)


@dataclass
class Pipeline:
    """One agent's pull machinery on a store under the test's temporary directory."""

    settings: AgentSettings
    store: Store
    egress: Egress
    fetcher: Fetcher
    sources: dict[str, Source]
    puller: Puller
    metrics: Metrics
    index: Index = field(default_factory=Index)

    async def pull(self, uri: str, include: Iterable[str] | None = None, *,
                   credentials: Mapping[str, str] | None = None, pin: bool = False,
                   ok: bool = True) -> Model:
        """Ensure the model and wait for its pull; with ``ok`` it must end ready."""
        model = await self.puller.ensure(parse(uri, include), credentials=credentials, pin=pin)
        if model.task is not None:
            await model.task
        if ok:
            assert model.state == READY, model.error
        return model

    async def refresh(self, model: Model) -> None:
        """Run the refreshes that are due and wait for this model's."""
        self.puller.refresh_due()
        assert model.refreshing, "no refresh was due"
        assert model.task is not None
        await model.task

    def tree(self, model: Model) -> dict[str, bytes]:
        """The published tree's files, by relative path."""
        assert model.manifest is not None
        return read_tree(self.store.models / model.key / model.manifest.tree)

    def pulled_bytes(self, scheme: str) -> float:
        """Bytes downloaded from sources of ``scheme`` so far (the metric)."""
        return self.metrics.pulled_bytes.labels(scheme=scheme)._value.get()  # type: ignore[no-any-return]

    def blob_count(self) -> int:
        return sum(1 for _ in self.store.blobs)

    async def close(self) -> None:
        await self.puller.stop()
        await self.fetcher.close()
        for source in {id(s): s for s in self.sources.values()}.values():
            await source.close()


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def files_named(root: Path, name: str) -> list[Path]:
    """Every file called ``name`` under ``root`` (to prove nothing escaped). os.walk, not
    rglob: servers under ``root`` (the registry's upload directories) may remove a
    directory while it is walked, which rglob raises on."""
    return [Path(d) / name for d, _, files in os.walk(root) if name in files]


PipelineFactory = Callable[..., Any]


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[PipelineFactory]:
    """``await pipeline(sources=SourceSettings(...), allow_hosts=..., refresh_interval=...,
    fetch=FetchSettings(...), store="name")``: a :class:`Pipeline`, closed at teardown."""
    made: list[Pipeline] = []

    async def make(*, sources: SourceSettings | None = None,
                   allow_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
                   refresh_interval: float = 3600.0, fetch: FetchSettings = TEST_FETCH,
                   store: str = "store", **egress: Any) -> Pipeline:
        settings = AgentSettings(
            node_name="test-node", refresh_interval=refresh_interval,
            store=StoreSettings(path=tmp_path / store), fetch=fetch,
            egress=replace(EgressSettings(), allow_hosts=allow_hosts, **egress),
            sources=sources or SourceSettings(),
        )
        st = Store(settings.store.path)
        recover(st)
        eg = Egress(settings.egress)
        fetcher = Fetcher(st, eg, settings.fetch, settings.archive)
        srcs = build_sources(eg, settings)
        index = Index()
        metrics = Metrics(node="test-node")
        usage, ledger = Usage(index), Ledger(st, index)
        evictor = Evictor(st, index, settings.store, usage, ledger,
                          Leases(st.leases_file, st.tmp, index, usage), metrics)
        puller = Puller(store=st, fetcher=fetcher, sources=srcs, index=index, egress=eg,
                        settings=settings, metrics=metrics,
                        reserver=Reservations(evictor, ledger))
        p = Pipeline(settings, st, eg, fetcher, srcs, puller, metrics, index)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials, profile or metadata service from the machine leak into a test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
