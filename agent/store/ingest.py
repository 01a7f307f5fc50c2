"""Ingest: partial downloads that hash while they write, resume, and commit atomically.

Follows containerd's local content writer: one writer per ref under a lock ("locked since
..."), resumable, and ``commit(size, expected)`` does fsync -> check size -> check digest ->
link into ``blobs/`` -> fsync the directory, the blob read-only before it has its name.

A partial download lives in ``partial/<ref>/``:

- ``data``: the bytes, written at their offsets by several connections at once;
- ``state.json``: the identity of what is being downloaded (size, sha256, etag) and the
  progress of each segment, written (temp + rename) only after an ``fdatasync`` of ``data``,
  so the progress it claims is on disk;
- ``lock``: ``flock``-ed by the writer, holding its pid and start time.

This module owns that directory: opening and locking, writes at offsets, checkpoints, and
sealing or committing. How the bytes are divided among streams is
:mod:`agent.store.segments`; how they are hashed in order as they land is
:mod:`agent.store.hashing`; content that arrives in order goes through
:mod:`agent.store.writer` instead.

Everything here blocks; it runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from agent.store import segments
from agent.store.blobs import BlobStore
from agent.store.direct import aligned, open_direct
from agent.store.hashing import OrderedHash
from agent.store.segments import Segment
from agent.store.writer import Sealed
from common.errors import IntegrityError, Locked, NoSpace, StoreError

STATE_VERSION = 1
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_ref(ref: str) -> str:
    """A ref names a directory under ``partial/``: one plain path segment, nothing more."""
    if not isinstance(ref, str) or not _REF.match(ref):
        raise StoreError(f"{str(ref)[:80]!r} is not a valid ingest ref")
    return ref


class Ingest:
    """One partial download. Create with :meth:`open`; finish with :meth:`commit`,
    :meth:`seal` + :meth:`discard`, or :meth:`close` (keeps it for a later resume)."""

    def __init__(self, directory: Path, ref: str, lock_fd: int, identity: dict[str, Any]) -> None:
        self.dir = directory
        self.ref = ref
        self._lock_fd = lock_fd
        self.identity = identity
        self.data_path = directory / "data"
        self._forget_committed_data()
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.dfd = open_direct(self.data_path)
        """The same file opened O_DIRECT (-1 where the file system refuses it): aligned
        chunks go to disk without a copy through the page cache."""
        self.segments: list[Segment] = []
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()
        self._since_checkpoint = 0
        self._checkpointed = time.monotonic()
        self._hash = OrderedHash(ref, self.data_path, self.fd, self._cond,
                                 lambda: segments.contiguous(self.segments),
                                 lambda: segments.finished(self.segments), identity)
        self._load_state()

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, partial_root: Path, ref: str, identity: dict[str, Any]) -> Ingest:
        """Take the lock of ``ref`` and open (or resume) its partial download.

        ``identity`` (size, sha256 or git_oid, etag, url) decides whether bytes already on
        disk belong to the same content: if it differs, the partial download starts over.
        """
        directory = partial_root / check_ref(ref)
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another writer"
            os.close(fd)
            raise Locked(f"ingest {ref} locked since {holder}") from None
        stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by pid {os.getpid()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        try:
            return cls(directory, ref, fd, identity)
        except BaseException:
            os.close(fd)
            raise

    def _forget_committed_data(self) -> None:
        """A crash after :meth:`commit` linked ``data`` into ``blobs/`` but before the partial
        was removed leaves ``data`` as a second name of a committed blob: never write (or
        truncate) through it; the content is already in the store."""
        try:
            st = os.stat(self.data_path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if st.st_nlink > 1:
            self.data_path.unlink()
            (self.dir / "state.json").unlink(missing_ok=True)

    def _load_state(self) -> None:
        try:
            state = json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            state = None
        if (
            isinstance(state, dict)
            and state.get("version") == STATE_VERSION
            and state.get("identity") == self.identity
        ):
            self.segments = [Segment(int(s), None if e is None else int(e), int(d))
                             for s, e, d in state.get("segments", [])]
        else:
            self.segments = []
        # The state only claims bytes that were on disk when it was written; if the data
        # file no longer holds them (it was moved into blobs/ by a commit that did not
        # finish its cleanup), the claim is void.
        on_disk = os.fstat(self.fd).st_size
        if not self.segments or any(s.offset > on_disk for s in self.segments):
            self.segments = []
            os.ftruncate(self.fd, 0)

    def pool_rest(self, seg: Segment, keep: int, min_part: int) -> bool:
        """Pool the rest of ``seg`` past ``keep`` bytes, for streams to take in pieces
        (:func:`agent.store.segments.pool_rest`)."""
        with self._cond:
            return segments.pool_rest(self.segments, seg, keep, min_part)

    def take_piece(self, size: int) -> Segment | None:
        """The next piece of the pool, for a stream to fetch
        (:func:`agent.store.segments.take_piece`)."""
        with self._cond:
            self._compact_locked()  # a stream is done with its piece: keep the list short
            return segments.take_piece(self.segments, size)

    def _compact_locked(self) -> None:
        """Merge adjacent complete segments (caller holds ``_cond``)."""
        self.segments = segments.compact(self.segments)

    @property
    def resumed_bytes(self) -> int:
        """Bytes already on disk from an earlier attempt."""
        return sum(s.done for s in self.segments)

    def plan(self, size: int | None, parts: int, min_part: int) -> list[Segment]:
        """Split the file into segments (kept as they are when resuming the same plan)."""
        if self.segments and self._planned_size() == size:
            return self.segments
        os.ftruncate(self.fd, 0)  # a new plan: nothing on disk is valid any more
        self.segments = segments.plan(size, parts, min_part)
        if size is not None:
            self._preallocate(size)
        self._write_state()
        return self.segments

    def _preallocate(self, size: int) -> None:
        """Reserve the file's blocks up front: out of space shows now, not mid-download."""
        if size == 0:
            return
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(
                    f"no space for {self.ref}: {size} bytes do not fit ({e.strerror})"
                ) from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise StoreError(f"cannot allocate {self.ref}: {e.strerror}") from e
        os.ftruncate(self.fd, size)

    def _planned_size(self) -> int | None:
        if not self.segments:
            return -1
        return self.segments[-1].end

    # --- writing -------------------------------------------------------------------------

    def start_hasher(self) -> None:
        """Start the ordered hash thread (after :meth:`plan`)."""
        self._hash.start()

    def write(self, seg: Segment, data: memoryview) -> threading.Event | None:
        """Write bytes at the segment's current offset and advance it.

        Returns an event to wait for before ``data``'s buffer is reused (the sha256 thread
        may still be reading it), or None if the buffer is free at once."""
        if seg.end is not None and seg.offset + len(data) > seg.end:
            raise IntegrityError(
                f"server sent more bytes than the range {seg.start}-{seg.end - 1} holds"
            )
        start = offset = seg.offset
        view = data
        fd = self.dfd if self.dfd >= 0 and aligned(start, data) else self.fd
        try:
            while view:
                try:
                    n = os.pwrite(fd, view, offset)
                except OSError as e:
                    if fd != self.dfd or e.errno != errno.EINVAL:
                        raise
                    self._drop_direct()  # the file system takes no direct I/O after all
                    fd = self.fd
                    continue
                offset += n
                view = view[n:]
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left writing {self.ref}: {e.strerror}") from e
            raise StoreError(f"cannot write partial download {self.ref}: {e.strerror}") from e
        pending = self._hash.inline(start, data)  # before the hash thread sees the write
        with self._cond:
            seg.done += len(data)
            self._since_checkpoint += len(data)
            self._cond.notify_all()
        return pending

    def maybe_checkpoint(self, every: int, seconds: float = 1.0) -> None:
        """Make progress durable if ``every`` bytes arrived, or ``seconds`` passed, since the
        last checkpoint (a restart re-fetches at most that much)."""
        due = self._since_checkpoint >= every or (
            self._since_checkpoint and time.monotonic() - self._checkpointed >= seconds)
        if due and self._state_lock.acquire(blocking=False):
            try:
                self._checkpoint_locked()
            finally:
                self._state_lock.release()

    def checkpoint(self) -> None:
        """fdatasync the data, then record the progress that is now durable."""
        with self._state_lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        with self._cond:
            self._compact_locked()
            snapshot = [(s.start, s.end, s.done) for s in self.segments]
            self._since_checkpoint = 0
            self._checkpointed = time.monotonic()
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise StoreError(f"cannot sync partial download {self.ref}: {e.strerror}") from e
        self._write_state(snapshot)

    def _write_state(self, snapshot: list[tuple[int, int | None, int]] | None = None) -> None:
        if snapshot is None:
            snapshot = [(s.start, s.end, s.done) for s in self.segments]
        state = {"version": STATE_VERSION, "identity": self.identity, "segments": snapshot}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / "state.json")

    def mark_complete(self) -> None:
        """Declare a stream of unknown size finished at what was written."""
        with self._cond:
            last = self.segments[-1]
            if last.end is None:
                last.end = last.start + last.done
            self._cond.notify_all()

    # --- finishing -----------------------------------------------------------------------

    def seal(self, expected_size: int | None, expected_sha256: str | None, *,
             expected_git_oid: str | None = None) -> Sealed:
        """fsync -> check size -> check digests. The bytes stay in the partial directory."""
        if not segments.finished(self.segments):
            raise StoreError(f"partial download {self.ref} is not complete")
        try:
            os.fsync(self.fd)
            size = os.fstat(self.fd).st_size
        except OSError as e:
            raise StoreError(f"cannot sync {self.ref}: {e.strerror}") from e
        written = segments.contiguous(self.segments)
        if size != written:
            os.ftruncate(self.fd, written)
            size = written
        if expected_size is not None and size != expected_size:
            raise IntegrityError(f"size mismatch: expected {expected_size} bytes, got {size}")
        self._hash.wait(size)
        stated = self._hash.stated()
        sha = stated if self.identity.get("sha256") else None
        oid = stated if sha is None and self.identity.get("git_oid") else None
        if expected_sha256 is not None and sha != expected_sha256:
            raise IntegrityError(
                f"sha256 mismatch: the source stated {expected_sha256}, the bytes are {sha}"
            )
        if expected_git_oid is not None and oid != expected_git_oid:
            raise IntegrityError(
                f"git blob id mismatch: the source stated {expected_git_oid}, the bytes are "
                f"{oid}")
        return Sealed(self.data_path, size, self._hash.blake3(), sha, oid)

    def commit(self, blobs: BlobStore, expected_size: int | None,
               expected_sha256: str | None, *, expected_git_oid: str | None = None
               ) -> Sealed:
        """Seal, then move the bytes into ``blobs/`` under their blake3 and remove the
        partial directory. A blob that already exists is success."""
        sealed = self.seal(expected_size, expected_sha256, expected_git_oid=expected_git_oid)
        self._stop_hasher()
        self._drop_direct()
        os.close(self.fd)
        self.fd = -1
        blobs.commit(sealed.path, sealed.blake3, hold=True)
        self.discard()
        return sealed

    def _stop_hasher(self) -> None:
        self._hash.stop()

    def close(self) -> None:
        """Stop, make progress durable, and release the lock; the partial stays."""
        self._stop_hasher()
        self._drop_direct()
        if self.fd >= 0:
            with contextlib.suppress(StoreError, OSError):
                self.checkpoint()
            os.close(self.fd)
            self.fd = -1
        self._release()

    def discard(self) -> None:
        """Remove the partial download and release the lock."""
        self._stop_hasher()
        self._drop_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.dir, ignore_errors=True)
        self._release()

    def _drop_direct(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
