"""The splitter, through the fetch engine, against the fault server on 127.0.0.1: a slow
file gets more connections, doubling while that pays and no longer once it does not; the
extra streams take the rest of the file in pieces, in file order.

What the splitter did is read from the pull's :class:`FetchStats` (``streams``: the file's
stream count at the start and after each split), what the server saw from its own log."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from agent.egress import Egress
from agent.fetch.engine import Fetcher
from agent.fetch.stats import FetchStats
from agent.settings import EgressSettings, FetchSettings
from agent.sources.control import Control
from agent.sources.http import HttpSource
from agent.store.local import Store
from common.reference import parse
from tests.servers.faulty import Fault, FaultyServer, Link, Served, most_at_once

MiB = 1024 * 1024


async def fetch(tmp_path: Path, faulty: FaultyServer, data: bytes, fault: Fault,
                **settings: object) -> FetchStats:
    """Resolve and fetch ``data`` served at ``/m.bin`` with ``fault`` on every GET, as
    the agent does (HEAD, then the engine's GETs); check the blob is exact; return the
    pull's stats."""
    faulty.add("/m.bin", data)
    faulty.always("/m.bin", fault)
    store = Store(tmp_path / "store")
    store.ensure_layout()
    egress = Egress(EgressSettings(allow_hosts=("127.0.0.1",)))
    fetcher = Fetcher(store, egress, replace(FetchSettings(), retries=4, backoff_base=0.01,
                                             backoff_max=0.05, **settings))  # type: ignore[arg-type]
    source = HttpSource(Control(egress))
    stats = FetchStats()
    try:
        resolved = await source.resolve(parse(faulty.url("/m.bin")), None)
        [entry] = await fetcher.fetch(source, resolved.files[0], None, lambda n: None, stats)
    finally:
        await fetcher.close()
        await source.close()
    assert store.blobs.path(entry.blake3).read_bytes() == data
    return stats


def assert_pieces_in_order(gets: list[Served], streams: int) -> None:
    """The extra streams took the rest of the file in 1 MiB pieces, in file order (so the
    ordered hash follows them closely), and each piece was asked for once. (The streams
    take pieces in order; their requests reach the server in nearly that order.)"""
    starts = [g.start for g in sorted(gets, key=lambda g: g.began)]
    assert starts[0] == 0 and all(s % MiB == 0 for s in starts)
    assert len(set(starts)) == len(starts), starts
    for i, start in enumerate(starts):
        assert start >= max(starts[: i + 1]) - streams * MiB, starts


@pytest.mark.slow
async def test_a_slow_stream_is_split_across_connections(tmp_path: Path,
                                                         faulty: FaultyServer) -> None:
    data = os.urandom(8 * MiB)
    stats = await fetch(tmp_path, faulty, data, Fault(rate=2 * MiB, methods=("GET",)),
                        segment_min_bytes=MiB, connections_per_file=4, split_interval=0.2,
                        split_below_rate=8 * MiB)  # 2 MiB/s per connection
    assert stats.streams["m.bin"][:2] == [1, 2], stats.streams
    gets = faulty.gets("/m.bin")
    assert 2 <= most_at_once(gets) <= 5, "slow streams got more connections, up to the cap"
    assert_pieces_in_order(gets, 4)
    # the cut stream stops at the cut: bytes past it may be in flight, but each byte of the
    # file was written once and the result is exact
    assert faulty.bytes_sent("/m.bin") < 2 * len(data)


SPLITTING = {"segment_min_bytes": MiB, "connections_per_file": 8, "split_interval": 0.1,
             "split_below_rate": 8 * MiB, "buffer_bytes": 256 * 1024}
"""Up to 8 connections, looks every 0.1 s, streams under 8 MiB/s are slow."""


@pytest.mark.slow
async def test_slow_streams_double_up_to_the_cap(tmp_path: Path,
                                                 faulty: FaultyServer) -> None:
    # a CDN that caps each connection (Hugging Face's gives one stream ~40 MB/s): the file
    # reaches its full width in three splits, not seven
    data = os.urandom(32 * MiB)
    stats = await fetch(tmp_path, faulty, data, Fault(rate=2 * MiB, methods=("GET",)),
                        **SPLITTING)
    assert stats.streams["m.bin"] == [1, 2, 4, 8]
    # (+1: the first response, cut short, runs on at the server until it finds the
    # connection closed)
    assert 8 <= most_at_once(faulty.gets("/m.bin")) <= 9
    assert_pieces_in_order(faulty.gets("/m.bin"), 8)
    assert faulty.bytes_sent("/m.bin") < 2 * len(data)


@pytest.mark.slow
async def test_streams_stop_growing_when_more_connections_do_not_help(
        tmp_path: Path, faulty: FaultyServer) -> None:
    # the link (or an overloaded server) is the limit, not each connection: after one split
    # that did not raise the rate, no more connections are opened
    data = os.urandom(12 * MiB)
    stats = await fetch(tmp_path, faulty, data, Fault(link=Link(4 * MiB), methods=("GET",)),
                        **SPLITTING)
    assert stats.streams["m.bin"] == [1, 2]
    assert 2 <= most_at_once(faulty.gets("/m.bin")) <= 3  # (+1 as above)


async def test_a_fast_stream_is_not_split(tmp_path: Path, faulty: FaultyServer) -> None:
    data = os.urandom(8 * MiB)
    stats = await fetch(tmp_path, faulty, data, Fault(methods=("GET",)), **SPLITTING)
    assert stats.streams["m.bin"] == [1]
    assert len(faulty.gets("/m.bin")) == 1
