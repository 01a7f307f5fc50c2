"""A real ENOSPC in the middle of a pull: evict and retry once, else fail cleanly.

The pull is a tar archive over HTTP: its download is preallocated when it starts
(``posix_fallocate``), but its members are written one by one as it is unpacked, so a file
of random data written while the download is held squeezes the space they need and the
kernel answers ENOSPC to a ``write`` in the middle of a member.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.evict import Eviction
from tests.evict.helpers import (
    MiB,
    blob_digests,
    fill,
    key_of,
    serve_models,
    until,
    verify_blobs,
    visible_models,
)
from tests.servers.faulty import Fault, FaultyServer

pytestmark = pytest.mark.timeout(60)


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def squeezed_pull(fs: Path, agent: Any, faulty: FaultyServer, leave: int) -> dict[str, Any]:
    """Pull a 12 MiB tar; once its download is under way, fill the disk but ``leave``."""
    faulty.add("/T.tar", tar_of({"w/a.bin": os.urandom(6 * MiB), "w/b.bin": os.urandom(6 * MiB)}))
    hold = threading.Event()
    faulty.fault("/T.tar", Fault(hold=hold, stall_after=MiB, methods=("GET",)))
    status, model = await agent.call("POST", "/api/v1/models", {"uri": faulty.url("/T.tar")})
    assert status == 202
    await until(lambda: faulty.bytes_sent("/T.tar") >= MiB)
    st = os.statvfs(fs)
    fill(fs / "squeeze", st.f_bavail * st.f_frsize - leave)
    hold.set()
    return await agent.wait(model["key"])


async def test_enospc_mid_write_evicts_and_the_retry_succeeds(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.99, low=0.9)
    events: list[Eviction] = []
    agent.evictor.on_evict(events.append)
    uris = serve_models(faulty, "P", 10 * MiB) | serve_models(faulty, "E", 16 * MiB)
    assert (await agent.pull(uris["P"], pin=True))["state"] == "ready"
    assert (await agent.pull(uris["E"]))["state"] == "ready"

    model = await squeezed_pull(fs, agent, faulty, leave=9 * MiB)
    assert model["state"] == "ready", model
    assert [(e.key, e.reason) for e in events] == [(key_of(uris["E"]), "no_space")]
    assert len(faulty.gets("/T.tar")) == 2, "one failed attempt, one retry"
    assert set(visible_models(fs / "store")) == {key_of(uris["P"]), model["key"]}
    verify_blobs(fs / "store")
    assert not os.listdir(fs / "store" / "partial")
    assert await agent.metric("modelcache_evictions_total", reason="no_space") == 1


async def test_enospc_mid_write_with_nothing_to_evict_fails_cleanly(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any],
        faulty: FaultyServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.99, low=0.9)
    uris = serve_models(faulty, "P", 10 * MiB) | serve_models(faulty, "E", 16 * MiB)
    assert (await agent.pull(uris["P"], pin=True))["state"] == "ready"
    assert (await agent.pull(uris["E"]))["state"] == "ready"
    assert (await agent.lease(key_of(uris["E"]), "trainer"))[0] == 201
    committed = blob_digests(fs / "store")

    model = await squeezed_pull(fs, agent, faulty, leave=9 * MiB)
    assert model["state"] == "failed"
    error = model["error"]
    assert f"model {model['key']} ran out of space while writing" in error
    assert "no space left writing a blob: No space left on device" in error  # a write()
    assert "would free only 0" in error
    assert len(faulty.gets("/T.tar")) == 1, "nothing could be evicted: no retry"
    assert not os.listdir(fs / "store" / "partial"), "its partial download is removed"
    assert not [n for n in os.listdir(fs / "store" / "tmp") if n.startswith("blob-")]
    assert set(visible_models(fs / "store")) == {key_of(uris[n]) for n in "PE"}
    assert committed.items() <= blob_digests(fs / "store").items()
    verify_blobs(fs / "store")
    assert await agent.metric("modelcache_pull_failures_total", reason="no_space") == 1
