"""The one redirect rule (``Egress.redirect``) on both HTTP paths, against fault servers on
127.0.0.1 and 127.0.0.2: the control plane (``Control.request`` -> ``Egress.request``, as
listings, manifests and HEADs go) and the data plane (the fetch engine's ranged GETs).

Each rule runs on both paths: credentials are dropped when a hop changes host and stay
dropped when the chain comes back (A -> B -> A); https never downgrades to http; every hop,
not just the first, passes the egress policy; a chain is cut after five redirects."""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from agent.egress import Egress
from agent.fetch.engine import Fetcher
from agent.fetch.stats import FetchStats
from agent.settings import EgressSettings, FetchSettings
from agent.sources.base import RemoteFile
from agent.sources.control import Control
from agent.sources.http import HttpSource
from agent.store.local import Store
from common.errors import NotAllowed, SourceError
from tests.servers.faulty import Fault, FaultyServer, faulty_server

TOKEN = "s3cr3t-token-0123456789"
DATA = os.urandom(300_000)

Get = Callable[[Egress, str], Awaitable[bytes]]
"""GET a URL with the credentials (``Authorization: Bearer TOKEN``) on one path."""


async def control_get(egress: Egress, url: str) -> bytes:
    control = Control(egress, retries=1)
    try:
        reply = await control.request("GET", url, headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        await control.close()
    return reply.body


def data_get(store: Store) -> Get:
    async def get(egress: Egress, url: str) -> bytes:
        fetcher = Fetcher(store, egress, replace(FetchSettings(), retries=1))
        source = HttpSource(Control(egress))
        try:
            [entry] = await fetcher.fetch(source, RemoteFile(path="m.bin", url=url),
                                          {"token": TOKEN}, lambda n: None, FetchStats())
        finally:
            await fetcher.close()
            await source.close()
        return store.blobs.path(entry.blake3).read_bytes()

    return get


@pytest.fixture(params=["control", "data"])
def get(request: pytest.FixtureRequest, store: Store) -> Get:
    """The same GET on each path."""
    return control_get if request.param == "control" else data_get(store)


@pytest.fixture
def a(faulty: FaultyServer) -> FaultyServer:
    """Host A (127.0.0.1), serving the file at ``/m.bin``."""
    faulty.add("/m.bin", DATA)
    return faulty


@pytest.fixture
def b() -> Iterator[FaultyServer]:
    """Host B (127.0.0.2)."""
    with faulty_server("127.0.0.2") as server:
        yield server


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[FaultyServer, Path]]:
    """An HTTPS fault server on 127.0.0.1 and the CA file that trusts it."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with faulty_server(ssl_context=context) as server:
        server.add("/m.bin", DATA)
        yield server, tmp_path / "ca.pem"


def egress(*allow: str, ca_file: Path | None = None) -> Egress:
    return Egress(EgressSettings(allow_hosts=allow or ("127.0.0.1", "127.0.0.2"),
                                 ca_file=ca_file))


def redirect(server: FaultyServer, path: str, to: str, status: int = 302) -> None:
    server.always(path, Fault(redirect=to, redirect_status=status))


async def test_a_same_host_redirect_keeps_the_credentials(get: Get, a: FaultyServer) -> None:
    redirect(a, "/start", "/m.bin")
    assert await get(egress(), a.url("/start")) == DATA
    assert [r.authorization for r in a.log()] == [f"Bearer {TOKEN}"] * 2


async def test_credentials_dropped_at_another_host_stay_dropped_back_at_the_first(
        get: Get, a: FaultyServer, b: FaultyServer) -> None:
    redirect(a, "/start", b.url("/hop"))
    redirect(b, "/hop", a.url("/m.bin"), status=307)
    assert await get(egress(), a.url("/start")) == DATA
    assert a.log("/start")[0].authorization == f"Bearer {TOKEN}"
    assert [r.authorization for r in b.log()] == [None]
    assert [r.authorization for r in a.gets("/m.bin")] == [None], \
        "the chain came back to A: the credentials must not come back with it"


async def test_https_never_downgrades_to_http(
        get: Get, a: FaultyServer, tls: tuple[FaultyServer, Path]) -> None:
    server, ca_file = tls
    e = egress(ca_file=ca_file)
    redirect(server, "/same", "/m.bin")
    assert await get(e, server.url("/same")) == DATA  # https -> https is followed
    redirect(server, "/down", a.url("/m.bin"))
    with pytest.raises(NotAllowed, match="downgrades https to http"):
        await get(e, server.url("/down"))
    assert a.log() == [], "the http host was never asked"


async def test_every_hop_is_checked_by_the_egress_policy(
        get: Get, a: FaultyServer, b: FaultyServer) -> None:
    only_a = egress(f"127.0.0.1:{urlsplit(a.base_url).port}")
    port_b = urlsplit(b.base_url).port
    redirect(a, "/start", "/next")  # the first redirect stays on A: allowed
    redirect(a, "/next", b.url("/m.bin"))  # the second leaves for unlisted B
    with pytest.raises(NotAllowed, match=f"loopback address.*--allow-host 127.0.0.2:{port_b}"):
        await get(only_a, a.url("/start"))
    assert [r.path for r in a.log()] == ["/start", "/next"]
    assert b.log() == [], "the refused host was never contacted"

    redirect(a, "/ftp", "ftp://127.0.0.1/m.bin")
    with pytest.raises(NotAllowed, match="scheme 'ftp'"):
        await get(only_a, a.url("/ftp"))


async def test_a_chain_is_cut_after_five_redirects(get: Get, a: FaultyServer) -> None:
    redirect(a, "/loop", "/loop")
    with pytest.raises(SourceError, match=r"too many redirects \(more than 5\)"):
        await get(egress(), a.url("/loop"))
    assert len(a.log("/loop")) == 6


async def test_a_redirect_without_location_fails(get: Get, a: FaultyServer) -> None:
    redirect(a, "/nowhere", "")
    with pytest.raises(SourceError, match="has no Location"):
        await get(egress(), a.url("/nowhere"))
