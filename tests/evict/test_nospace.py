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

from agent.eviction.evictor import Eviction
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
from tests.servers.hfhub import HubServer

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
    assert "nothing may be evicted" in error
    assert len(faulty.gets("/T.tar")) == 1, "nothing could be evicted: no retry"
    assert not os.listdir(fs / "store" / "partial"), "its partial download is removed"
    assert not [n for n in os.listdir(fs / "store" / "tmp") if n.startswith("blob-")]
    assert set(visible_models(fs / "store")) == {key_of(uris[n]) for n in "PE"}
    assert committed.items() <= blob_digests(fs / "store").items()
    verify_blobs(fs / "store")
    assert await agent.metric("modelcache_pull_failures_total", reason="no_space") == 1


async def test_enospc_preallocating_the_next_file_evicts_and_fetches_only_what_is_left(
        tmpfs: Callable[..., Path], agent_on: Callable[..., Any], faulty: FaultyServer,
        hf_hub: HubServer) -> None:
    fs = tmpfs(64)
    agent = await agent_on(fs / "store", high=0.99, low=0.9, max_files=1,
                           hf_endpoint=hf_hub.base_url)
    events: list[Eviction] = []
    agent.evictor.on_evict(events.append)
    uris = serve_models(faulty, "P", 10 * MiB) | serve_models(faulty, "E", 16 * MiB)
    assert (await agent.pull(uris["P"], pin=True))["state"] == "ready"
    assert (await agent.pull(uris["E"]))["state"] == "ready"
    hf_hub.create_repo("org/big")
    hf_hub.commit("org/big", {"a.bin": os.urandom(12 * MiB), "b.bin": os.urandom(10 * MiB)},
                  lfs=["a.bin", "b.bin"])
    hold = threading.Event()  # a.bin (the larger) goes first: held once it is preallocated
    hf_hub.fault("resolve", Fault(hold=hold, stall_after=MiB, methods=("GET",)))
    _, model = await agent.call("POST", "/api/v1/models", {"uri": "hf://org/big"})
    await until(lambda: sum(r.sent for r in hf_hub.log("resolve")) >= MiB)
    st = os.statvfs(fs)
    fill(fs / "squeeze", st.f_bavail * st.f_frsize - 6 * MiB)  # b.bin (10 MiB) cannot fit
    hold.set()

    model = await agent.wait(model["key"])
    assert model["state"] == "ready", model
    assert [(e.key, e.reason) for e in events] == [(key_of(uris["E"]), "no_space")]
    gets = sorted(r.path.rsplit("/", 1)[1] for r in hf_hub.log("resolve") if r.method == "GET")
    # b.bin failed before its first byte (at its preallocation), a.bin was not fetched again
    assert gets == [".gitattributes", "a.bin", "b.bin"]
    assert set(visible_models(fs / "store")) == {key_of(uris["P"]), model["key"]}
    assert not os.listdir(fs / "store" / "partial")
    verify_blobs(fs / "store")
