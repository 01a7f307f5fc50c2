"""Files on a real disk with their pages in or out of the page cache, and a standalone
agent (the composition root's own ``build`` and ``serve``) serving file:// models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.pagecache.resident import resident_bytes

MiB = 1024 * 1024


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (``POSIX_FADV_DONTNEED`` after an
    fsync), as if the node had not read it since boot; fails if they stay (the test
    directory must be on a disk, not a tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    resident, size = resident_bytes(path)
    assert resident < size or size == 0, f"{path} stays in the page cache (tmpfs?)"


def write_cold(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes, none of them in the page cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    evict(path)
    return path


@pytest.fixture
def cold(tmp_path: Path) -> Callable[[str, int], Path]:
    """``cold("name", size)``: a file under the test's directory, out of the page cache."""
    return lambda name, size: write_cold(tmp_path / "files" / name, size)
