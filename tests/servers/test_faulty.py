"""The fault server serves like a web server and fails exactly as told (aiohttp client)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.servers.faulty import Fault, FaultyServer, faulty_server, parse_range
from tests.servers.net import fetch


async def get(
    url: str, headers: dict[str, str] | None = None, *, redirects: bool = True
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, headers=headers or {}, allow_redirects=redirects) as r,
    ):
        return r.status, CIMultiDict(r.headers), await r.read()


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range(None, 100) is None


async def test_ranges_and_validators(faulty: FaultyServer) -> None:
    data = os.urandom(200_000)
    res = faulty.add("/m/a.bin", data)
    status, headers, body = await get(faulty.url("/m/a.bin"))
    assert status == 200 and body == data and headers["ETag"] == res.etag
    assert "Last-Modified" in headers and headers["Accept-Ranges"] == "bytes"

    status, headers, body = await get(faulty.url("/m/a.bin"), {"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    assert headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"

    stale = {"Range": "bytes=100-", "If-Range": '"other"'}
    status, _, body = await get(faulty.url("/m/a.bin"), stale)
    assert status == 200 and body == data

    status, headers, _ = await get(faulty.url("/m/a.bin"), {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    assert [r.status for r in faulty.gets("/m/a.bin")] == [200, 206, 200, 416]


async def test_short_body_then_resume_fetches_nothing_twice(faulty: FaultyServer) -> None:
    data = os.urandom(300_000)
    faulty.add("/a.bin", data)
    faulty.fault("/a.bin", Fault(close_after=100_000))
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(faulty.url("/a.bin"))
    # the server records what it sent once its handler ends, which may be after the
    # client saw the connection close: wait for the record, do not race it
    def recorded(s: FaultyServer) -> bool:
        return bool(s.gets("/a.bin")) and s.gets("/a.bin")[0].sent >= 100_000

    await asyncio.to_thread(faulty.wait_for, recorded)
    got = faulty.gets("/a.bin")[0].sent
    assert got == 100_000
    status, _, rest = await get(faulty.url("/a.bin"), {"Range": f"bytes={got}-"})
    assert status == 206 and rest == data[got:]
    await asyncio.to_thread(faulty.wait_for, lambda s: len(s.gets("/a.bin")) == 2
                            and s.gets("/a.bin")[1].sent == len(data) - got)
    assert faulty.bytes_sent_twice("/a.bin") == 0
    assert faulty.spans("/a.bin") == [(0, 100_000), (100_000, 300_000)]


async def test_reset_and_storm(faulty: FaultyServer) -> None:
    faulty.add("/b.bin", os.urandom(300_000))
    faulty.fault("/b.bin", Fault(reset_after=50_000))
    with pytest.raises(aiohttp.ClientPayloadError) as e:
        await get(faulty.url("/b.bin"))
    assert "reset" in repr(e.value).lower() or "not enough data" in str(e.value).lower()

    faulty.fault("/b.bin", Fault(status=503, retry_after=2), times=3)
    codes = [(await get(faulty.url("/b.bin")))[:2] for _ in range(4)]
    assert [c for c, _ in codes] == [503, 503, 503, 200]
    assert codes[0][1]["Retry-After"] == "2"
    faulty.fault("/b.bin", Fault(status=429, retry_after=1))
    assert (await get(faulty.url("/b.bin")))[0] == 429


async def test_wrong_content_range_and_ignored_range(faulty: FaultyServer) -> None:
    data = bytes(range(256)) * 100
    faulty.add("/c.bin", data)
    faulty.fault("/c.bin", Fault(wrong_content_range=7), Fault(ignore_range=True))
    status, headers, body = await get(faulty.url("/c.bin"), {"Range": "bytes=10-19"})
    assert status == 206 and headers["Content-Range"] == f"bytes 17-26/{len(data)}"
    assert body == data[10:20]
    status, _, body = await get(faulty.url("/c.bin"), {"Range": "bytes=10-19"})
    assert status == 200 and body == data


async def test_slow_bytes_and_corruption(faulty: FaultyServer) -> None:
    data = os.urandom(40_000)
    faulty.add("/d.bin", data)
    faulty.fault("/d.bin", Fault(rate=100_000, corrupt_at=5))
    began = time.monotonic()
    _, _, body = await get(faulty.url("/d.bin"))
    assert time.monotonic() - began >= 0.3
    assert body[5] != data[5] and body[:5] + body[6:] == data[:5] + data[6:]


async def test_redirect_to_another_host_records_auth(
    faulty: FaultyServer, faulty_factory: Callable[..., FaultyServer]
) -> None:
    other = faulty_factory("127.0.0.2")
    other.add("/real.bin", b"payload")
    faulty.fault("/go", Fault(redirect=other.url("/real.bin"), redirect_status=307))
    status, headers, _ = await get(faulty.url("/go"), redirects=False)
    assert status == 307 and headers["Location"] == other.url("/real.bin")
    faulty.always("/meta", Fault(redirect="http://169.254.169.254/latest/meta-data/"))
    assert (await get(faulty.url("/meta"), redirects=False))[0] == 302

    # aiohttp drops Authorization when a redirect changes host: the log shows it
    faulty.fault("/go", Fault(redirect=other.url("/real.bin")))
    status, _, body = await get(faulty.url("/go"), {"Authorization": "Bearer s3cret"})
    assert status == 200 and body == b"payload"
    assert faulty.log("/go")[-1].authorization == "Bearer s3cret"
    assert other.log("/real.bin")[-1].authorization is None
    assert other.log("/real.bin")[-1].host.startswith("127.0.0.2:")


async def test_file_on_disk(faulty: FaultyServer, tmp_path: Path) -> None:
    root = tmp_path
    (root / "sub").mkdir()
    (root / "sub" / "w.bin").write_bytes(b"w" * 1000)
    faulty.add_tree(root, "/tree")
    status, _, body = await get(faulty.url("/tree/sub/w.bin"), {"Range": "bytes=-10"})
    assert status == 206 and body == b"w" * 10


async def test_hold_until_released(faulty: FaultyServer) -> None:
    faulty.add("/e.bin", b"e" * 100_000)
    gate = threading.Event()
    faulty.always("/e.bin", Fault(hold=gate, stall_after=10_000))
    tasks = [asyncio.create_task(get(faulty.url("/e.bin"))) for _ in range(10)]
    await asyncio.to_thread(faulty.wait_for, lambda s: s.bytes_sent("/e.bin") == 100_000)
    assert not any(t.done() for t in tasks)
    gate.set()
    bodies = [body for _, _, body in await asyncio.gather(*tasks)]
    assert bodies == [b"e" * 100_000] * 10
    assert len(faulty.gets("/e.bin")) == 10


def test_stops_its_thread() -> None:
    with faulty_server() as server:
        server.add("/x", b"x")
        assert fetch(server.url("/x")).body == b"x"
        names = {t.name for t in threading.enumerate()}
        assert "faulty-http" in names
    assert "faulty-http" not in {t.name for t in threading.enumerate()}
    with pytest.raises(OSError):
        fetch(server.url("/x"), timeout=2)
