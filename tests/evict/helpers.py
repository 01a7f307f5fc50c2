"""Helpers of the eviction tests: store checks, disk sampling, served models."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from agent.store.trees import MANIFEST, Manifest
from common.reference import parse
from tests.servers.faulty import FaultyServer

TOKEN = "evict-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1024 * 1024


def key_of(uri: str) -> str:
    return parse(uri).key


def used_ratio(path: Path) -> float:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) / st.f_blocks


def fill(path: Path, nbytes: int) -> None:
    """A file of random data taking ``nbytes`` of the filesystem (not cache content)."""
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def blob_digests(store: Path) -> dict[str, int]:
    """Every committed blob on disk: digest -> size."""
    out = {}
    for shard in (store / "blobs").iterdir():
        for blob in shard.iterdir():
            out[blob.name] = blob.stat().st_size
    return out


def verify_blobs(store: Path) -> int:
    """Hash every committed blob: its content must be its name. Returns how many."""
    n = 0
    for digest in blob_digests(store):
        path = store / "blobs" / digest[:2] / digest
        assert blake3.blake3(path.read_bytes()).hexdigest() == digest, f"blob {digest} damaged"
        assert path.stat().st_mode & 0o777 == 0o444
        n += 1
    return n


def visible_models(store: Path) -> dict[str, Manifest]:
    """Models visible on disk (a manifest), each checked complete: every file of its tree
    is its blob (same inode), whose content hashes to its digest."""
    found = {}
    for model_dir in (store / "models").iterdir():
        path = model_dir / MANIFEST
        if not path.exists():
            continue
        manifest = Manifest.from_json(json.loads(path.read_text()))
        tree = model_dir / manifest.tree
        for f in manifest.files:
            file = tree.joinpath(*f.path.split("/"))
            blob = store / "blobs" / f.blake3[:2] / f.blake3
            assert file.exists(), f"model {manifest.key} is visible but misses {f.path}"
            assert os.stat(file).st_ino == os.stat(blob).st_ino, f"{f.path} is not its blob"
            assert file.stat().st_size == f.size
            assert blake3.blake3(file.read_bytes()).hexdigest() == f.blake3
        found[manifest.key] = manifest
    return found


@dataclass
class DiskWatch:
    """Samples a filesystem's free bytes in a thread while a test runs."""

    path: Path
    interval: float = 0.001
    min_free: int = 1 << 62
    max_used_ratio: float = 0.0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> DiskWatch:
        self._thread = threading.Thread(target=self._run, name="disk-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            st = os.statvfs(self.path)
            self.min_free = min(self.min_free, st.f_bavail * st.f_frsize)
            self.max_used_ratio = max(self.max_used_ratio,
                                      (st.f_blocks - st.f_bfree) / st.f_blocks)
            self.samples += 1
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def waiting_on(event: asyncio.Event) -> int:
    """How many tasks are parked on ``event`` now (asyncio keeps its waiters' futures in
    ``_waiters``): such a task cannot move on until the event is set."""
    return sum(1 for waiter in event._waiters if not waiter.done())  # type: ignore[attr-defined]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def serve_models(faulty: FaultyServer, names: str, size: int) -> dict[str, str]:
    """One file of random bytes per name: name -> URI."""
    uris = {}
    for name in names:
        faulty.add(f"/{name}.bin", os.urandom(size))
        uris[name] = faulty.url(f"/{name}.bin")
    return uris
