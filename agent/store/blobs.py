"""Committed blobs: one read-only file per distinct content, named by its blake3 digest.

``blobs/<aa>/<digest>``. A blob is committed by linking a verified, fsynced, read-only file
into place (``link`` fails if the name exists, so two writers of the same content cannot
replace each other's inode), then fsyncing the directory. A blob's link count minus one is
the number of published trees that use it.

Blocking: every method here does file-system work; async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import StoreError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def valid_digest(digest: str) -> bool:
    """Whether a string is a blake3 digest as the store names blobs (64 lowercase hex)."""
    return bool(_DIGEST.match(digest))


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    refs: int
    """Trees linking this blob (link count minus the store's own name)."""


class BlobStore:
    """The ``blobs/`` directory of a store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._holds: Counter[str] = Counter()
        """Blobs a running pull committed or found and has not published yet: garbage
        collection leaves them alone."""

    def hold(self, digest: str) -> None:
        with self._lock:
            self._holds[digest] += 1

    def release(self, digests: Iterable[str]) -> None:
        with self._lock:
            for digest in digests:
                self._holds[digest] -= 1
                if self._holds[digest] <= 0:
                    del self._holds[digest]

    def held(self) -> set[str]:
        with self._lock:
            return set(self._holds)

    def path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise StoreError(f"not a blake3 digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def info(self, digest: str) -> BlobInfo | None:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(digest, st.st_size, st.st_nlink - 1)

    def modified(self, digest: str) -> float | None:
        """When a blob was last modified (written, before its commit), or None if it is
        gone."""
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def commit(self, src: Path, digest: str, hold: bool = False) -> bool:
        """Move a verified file into the store under its digest.

        ``src`` must already be fsynced and hold exactly the content named by ``digest``.
        Returns ``True`` if this call created the blob, ``False`` if it already existed
        (which is success: the content is the same). ``src`` is gone afterwards. With
        ``hold``, the blob is held (see :meth:`hold`) before it has its name.
        """
        dst = self.path(digest)
        if hold:
            self.hold(digest)
        os.chmod(src, 0o444)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            created = True
        except FileExistsError:
            created = False
        os.unlink(src)
        if created:
            fsync_dir(dst.parent)
        return created

    def collect(self, digest: str) -> int:
        """Garbage-collect a blob: remove it only if no tree links it and no pull holds
        it (checked under the lock that holds are taken under); return the bytes freed."""
        path = self.path(digest)
        with self._lock:
            if self._holds.get(digest):
                return 0
            try:
                st = path.stat()
            except FileNotFoundError:
                return 0
            if st.st_nlink > 1:
                return 0
            path.unlink()
            return st.st_size

    def remove(self, digest: str) -> int:
        """Remove a blob's store name; return the bytes freed (0 if trees still link it)."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return 0
        path.unlink()
        return st.st_size if st.st_nlink == 1 else 0

    def __iter__(self) -> Iterator[BlobInfo]:
        """Every committed blob (stale temporary names are skipped)."""
        for entry in self._entries():
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                yield BlobInfo(entry.name, st.st_size, st.st_nlink - 1)

    def digests(self) -> Iterator[str]:
        """The digest of every committed blob, from the directory listings alone (no
        ``stat``: a tenth of the time of iterating the blobs)."""
        return (entry.name for entry in self._entries())

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            shards = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            for entry in os.scandir(shard.path):
                if valid_digest(entry.name) and entry.name[:2] == shard.name:
                    yield entry


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a link) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path, mode: int = 0o644,
                 durable: bool = True) -> None:
    """Replace ``path`` with ``data``: a temporary file in ``tmp_dir`` (same file system),
    rename over ``path``; with ``durable``, fsync of the file before and of the directory
    after. A reader sees the old content or the new, never a part; a crash leaves at most a
    stray temporary file."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
