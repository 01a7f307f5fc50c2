"""Fixtures for the agent core's unit tests: a store on the test's temporary directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.store.local import Store
from agent.store.trees import FileEntry


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty store with its directories made."""
    s = Store(tmp_path / "store")
    s.ensure_layout()
    return s


@pytest.fixture
def put_blob(store: Store) -> Callable[..., FileEntry]:
    """Commit bytes as a blob through the store's sequential writer; returns a file entry
    (named ``path``) for it."""

    def put(data: bytes, path: str = "f.bin") -> FileEntry:
        writer = store.blob_writer()
        writer.write(data)
        sealed = writer.commit(store.blobs, len(data))
        store.note_blob(sealed.blake3, sealed.size)
        return FileEntry(path, sealed.size, sealed.blake3)

    return put
