"""The blob writer: content that arrives in order (archive members, local copies) written
and hashed in one pass, then committed into ``blobs/`` like a partial download.

``commit`` does fsync -> check size -> check digest -> link into ``blobs/`` under its
blake3 (a blob that already exists is success); :class:`Sealed` is what a commit (here or
in :mod:`agent.store.ingest`) returns.

Everything here blocks; it runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from agent.store.blobs import BlobStore
from common.errors import IntegrityError, NoSpace, StoreError


@dataclass(frozen=True)
class Sealed:
    """A fully written, fsynced and verified download."""

    path: Path
    size: int
    blake3: str
    sha256: str | None
    git_oid: str | None = None


class BlobWriter:
    """A sequential writer for content that arrives in order (archive members, local
    copies): hashes straight from the caller's buffer, commits like
    :class:`~agent.store.ingest.Ingest`."""

    def __init__(self, tmp_dir: Path, expected_sha256: str | None = None) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = tmp_dir / f"blob-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        self._b3 = blake3.blake3()
        self._expected_sha256 = expected_sha256
        self._sha = hashlib.sha256() if expected_sha256 else None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._b3.update(view)
        if self._sha is not None:
            self._sha.update(view)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left writing a blob: {e.strerror}") from e
            raise StoreError(f"cannot write a blob: {e.strerror}") from e
        self.size += len(data)

    def commit(self, blobs: BlobStore, expected_size: int | None = None) -> Sealed:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        try:
            if expected_size is not None and self.size != expected_size:
                raise IntegrityError(
                    f"size mismatch: expected {expected_size} bytes, got {self.size}"
                )
            sha = self._sha.hexdigest() if self._sha is not None else None
            if self._expected_sha256 is not None and sha != self._expected_sha256:
                raise IntegrityError(
                    f"sha256 mismatch: expected {self._expected_sha256}, the bytes are {sha}"
                )
            digest = self._b3.hexdigest()
            blobs.commit(self.path, digest, hold=True)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return Sealed(blobs.path(digest), self.size, digest, sha)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


__all__ = ["BlobWriter", "Sealed"]
