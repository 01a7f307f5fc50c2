"""The control plane at 1,000 nodes: simulated nodes (the agent's real status code and
CachedModel informer, the webhook's real counts controller) roll one CachedModel out
through the fake apiserver, and what crossed the wire per state change, and the size of
every object, does not grow with the number of nodes (tests/cluster/controlplane.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.controlplane import Figures, simulate
from tests.kubeapi import FakeKubeApi


@pytest.mark.slow
async def test_what_a_state_change_costs_does_not_grow_with_the_nodes(tmp_path: Path):
    figures: list[Figures] = []
    for nodes in (10, 100, 1000):
        async with FakeKubeApi(history=20_000) as api:
            figures.append(await simulate(api, nodes, tmp_path / str(nodes)))
    print("\n" + Figures.HEADER + "\n" + "\n".join(f.row() for f in figures))
    small, _, large = figures
    for f in figures:
        # each NodeCache write reaches one watcher (the counts controller), and nothing
        # about a node reaches the other nodes
        assert f.node_caches.watch_events == f.node_caches.writes
        assert f.counts.writes <= 2 * (60 // 5 + 2)  # at most one per 5 s per phase
    assert large.written_per_change <= 1.05 * small.written_per_change
    assert large.node_cache_watched_per_change <= 1.05 * small.node_cache_watched_per_change
    assert large.watched_per_change <= 1.5 * small.watched_per_change
    assert large.node_cache_bytes <= 1.05 * small.node_cache_bytes
    assert large.cached_model_bytes <= 1.05 * small.cached_model_bytes
