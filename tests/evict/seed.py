"""Build a store with many models directly through the store's API (fast, no network).

Used by the crash test and by ``bench/evict.py``. Model ``i`` has ``files`` files of its own
(random bytes) and one file shared with every model of the same ``shared`` group; its last
use is ``base + i`` seconds, so model 0 is the least recently used.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.store.local import Store
from agent.store.recovery import recover
from agent.store.trees import FileEntry, Manifest
from common.reference import parse


@dataclass
class Seeded:
    keys: list[str] = field(default_factory=list)
    """Model keys, least recently used first."""
    blobs: int = 0
    cache_bytes: int = 0


def uri_of(i: int) -> str:
    return f"http://127.0.0.1:9/seed/m{i}.bin"


def seed_store(root: Path, models: int, *, files: int = 1, size: int = 2048,
               shared_groups: int = 10, base: float | None = None) -> Seeded:
    store = Store(root)
    recover(store)
    base = time.time() - 10 * models if base is None else base
    out = Seeded()
    shared = [_blob(store, os.urandom(size), "config.json") for _ in range(shared_groups)]
    sizes = {e.blake3: e.size for e in shared}
    for i in range(models):
        own = [_blob(store, os.urandom(size), f"w/part-{j}.bin") for j in range(files)]
        sizes.update((e.blake3, e.size) for e in own)
        entries = (*own, shared[i % shared_groups]) if shared_groups else tuple(own)
        key = parse(uri_of(i)).key
        store.publish(Manifest(key=key, uri=uri_of(i), revision="r1", tree="",
                               files=tuple(entries), created=base + i, last_used=base + i,
                               resolved_at=base + i))
        out.keys.append(key)
    out.blobs = len(sizes)
    out.cache_bytes = sum(sizes.values())
    return out


def write_leases(root: Path, leases: dict[str, dict[str, float]]) -> None:
    (root / "leases.json").write_text(json.dumps({"version": 1, "leases": leases}))


def _blob(store: Store, data: bytes, path: str) -> FileEntry:
    writer = store.blob_writer()
    writer.write(data)
    sealed = writer.commit(store.blobs, len(data))
    store.note_blob(sealed.blake3, sealed.size)
    return FileEntry(path, sealed.size, sealed.blake3)
