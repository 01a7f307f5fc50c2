"""The agent's pull pipeline in-process, for the source tests: an agent built by the
composition root (the one harness, :class:`tests.servers.agent.InProcessAgent`, not served:
Store + Fetcher + Puller + Evictor + every source), real servers on loopback, the real
engine, nothing mocked.

``pipeline(...)`` builds one with settings suited to small test models: tiny segments (so
the parallel ranged reads really run), short backoffs, loopback allowed (127.0.0.1 for the
servers, 127.0.0.2 for the hub's CDN), and the source endpoints the test gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.auth import TokenFileAuth
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
from agent.store.local import Store
from common.reference import parse
from tests.servers.agent import InProcessAgent

LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.2")
TEST_FETCH = FetchSettings(
    connections_per_file=3, segment_min_bytes=64 * 1024, backoff_base=0.01, backoff_max=2.0,
    retries=4, connect_timeout=5.0, read_timeout=20.0,
)


@dataclass
class Pipeline:
    """One agent's pull machinery on a store under the test's temporary directory."""

    agent: InProcessAgent

    @property
    def settings(self) -> AgentSettings:
        return self.agent.settings  # type: ignore[no-any-return]

    @property
    def store(self) -> Store:
        return self.agent.deps.store  # type: ignore[no-any-return]

    @property
    def puller(self) -> Puller:
        return self.agent.deps.puller  # type: ignore[no-any-return]

    @property
    def fetcher(self) -> Fetcher:
        return self.puller.fetcher

    @property
    def sources(self) -> dict[str, Source]:
        return self.puller.sources

    @property
    def metrics(self) -> Metrics:
        return self.agent.deps.metrics  # type: ignore[no-any-return]

    @property
    def index(self) -> Index:
        return self.agent.deps.index  # type: ignore[no-any-return]

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
        return read_tree(self.store.tree_path(model.manifest))

    def pulled_bytes(self, scheme: str) -> float:
        """Bytes downloaded from sources of ``scheme`` so far (the metric)."""
        return self.metrics.pulled_bytes.labels(scheme=scheme)._value.get()  # type: ignore[no-any-return]

    def blob_count(self) -> int:
        return sum(1 for _ in self.store.blobs)


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
def pipeline(tmp_path: Path, in_process_agent: Callable[..., Any]) -> PipelineFactory:
    """``await pipeline(sources=SourceSettings(...), allow_hosts=..., refresh_interval=...,
    fetch=FetchSettings(...), store="name")``: a :class:`Pipeline`, closed at teardown."""

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
        agent = await in_process_agent(settings, auth=TokenFileAuth("pipeline-token-0123"),
                                       serve=False)
        return Pipeline(agent)

    return make


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials, profile or metadata service from the machine leak into a test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
