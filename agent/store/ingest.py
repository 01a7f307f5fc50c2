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

Hashing follows the contiguous written prefix in one thread per download: segments arrive
out of order, the hasher reads them back in order from the page cache (blake3, and sha256 or
a git blob id when the source stated one), so the digest is ready when the last byte lands.
After a restart the hasher re-reads what is already on disk; nothing is fetched twice.

Everything here blocks; it runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import mmap
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from agent.store.blobs import BlobStore
from common.errors import IntegrityError, Locked, NoSpace, StoreError

HASH_CHUNK = 4 * 1024 * 1024
DIRECT_ALIGN = 4096
SEGMENT_ALIGN = 1024 * 1024
STATE_VERSION = 1
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_ref(ref: str) -> str:
    """A ref names a directory under ``partial/``: one plain path segment, nothing more."""
    if not isinstance(ref, str) or not _REF.match(ref):
        raise StoreError(f"{str(ref)[:80]!r} is not a valid ingest ref")
    return ref


@dataclass
class Segment:
    """A byte range of the file, fetched by one connection at a time."""

    start: int
    end: int | None
    """Exclusive end; ``None`` while the size is unknown (a single streamed segment)."""
    done: int = 0
    """Bytes written from ``start``."""
    pooled: bool = False
    """No stream has it yet: streams take pieces from its front, in file order (the state
    keeps it as an ordinary segment, so a resume fetches it)."""

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done >= self.end

    @property
    def offset(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int | None:
        return None if self.end is None else self.end - self.offset


@dataclass(frozen=True)
class Sealed:
    """A fully written, fsynced and verified partial download."""

    path: Path
    size: int
    blake3: str
    sha256: str | None
    git_oid: str | None = None


def git_blob_hasher(size: int) -> Any:
    """sha1 primed with a git blob's header: fed the ``size`` bytes, its hex digest is the
    blob's git object id."""
    return hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)


class ShaPipe:
    """The source's digest (sha256, or a git blob's sha1) on a thread of its own, fed in
    order, so that it runs beside the receiving thread's recv + blake3 + write instead of
    after them (sha256 is the slowest of the three). A buffer handed to :meth:`feed` must not
    change until its event is set."""

    def __init__(self, hasher: Any) -> None:
        self._sha = hasher
        self._queue: queue.SimpleQueue[tuple[memoryview, threading.Event] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stated-digest", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            view, done = item
            self._sha.update(view)
            done.set()

    def feed(self, view: memoryview) -> threading.Event:
        done = threading.Event()
        self._queue.put((view, done))
        return done

    def hexdigest(self) -> str:
        """The digest of everything fed (waits for it; ends the thread)."""
        if self._digest is None:
            self.close()
            self._digest = self._sha.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


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
        self.dfd = _open_direct(self.data_path)
        """The same file opened O_DIRECT (-1 where the file system refuses it): aligned
        chunks go to disk without a copy through the page cache."""
        self.segments: list[Segment] = []
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()
        self._since_checkpoint = 0
        self._checkpointed = time.monotonic()
        self._closed = False
        self._hash_error: BaseException | None = None
        self._hasher: threading.Thread | None = None
        self._hashed = 0
        self._hash_lock = threading.Lock()
        """Held by whoever advances the hashes (the hash thread or an in-order writer)."""
        self._b3 = blake3.blake3()
        self._sha = _stated_pipe(identity)
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

    @property
    def received_bytes(self) -> int:
        """Bytes written so far (all segments)."""
        return sum(s.done for s in self.segments)

    def pool_rest(self, seg: Segment, keep: int, min_part: int) -> bool:
        """Leave ``seg`` the next ``keep`` bytes (rounded up to :data:`SEGMENT_ALIGN`) and
        pool the rest of it, for streams to take in pieces (:meth:`take_piece`). False if
        there is a pool already or too little is left."""
        with self._cond:
            if seg.end is None or seg not in self.segments or \
                    any(s.pooled for s in self.segments):
                return False
            cut = -(-(seg.offset + keep) // SEGMENT_ALIGN) * SEGMENT_ALIGN
            if seg.end - cut < min_part:
                return False
            pool = Segment(cut, seg.end, pooled=True)
            seg.end = cut
            self.segments.insert(self.segments.index(seg) + 1, pool)
            return True

    def take_piece(self, size: int) -> Segment | None:
        """The next piece of the pool, for a stream to fetch: ``size`` bytes, less near
        the end (so the streams finish together rather than wait on one last big piece),
        all of it if less than two pieces are left; None if there is no pool or it is
        empty. Pieces go in file order, so the ordered hash follows the streams closely."""
        with self._cond:
            self._compact_locked()  # a stream is done with its piece: keep the list short
            pool = next((s for s in self.segments if s.pooled), None)
            if pool is None or pool.end is None:
                return None
            streams = 1 + sum(1 for s in self.segments if not s.pooled and not s.complete)
            size = min(size, (pool.end - pool.start) // (2 * streams))
            size = max(SEGMENT_ALIGN, size // SEGMENT_ALIGN * SEGMENT_ALIGN)
            if pool.end - pool.start < 2 * size:
                pool.pooled = False
                return pool
            piece = Segment(pool.start, pool.start + size)
            pool.start += size
            self.segments.insert(self.segments.index(pool), piece)
            return piece

    def _compact_locked(self) -> None:
        """Merge adjacent complete segments into one: a file fetched in pieces would
        otherwise keep one per piece, walked by every ordered-hash step and written into
        every checkpoint. Their streams are done with them. Caller holds ``_cond``."""
        out: list[Segment] = []
        for seg in self.segments:
            prev = out[-1] if out else None
            if prev is not None and prev.complete and seg.complete and prev.end == seg.start:
                out[-1] = Segment(prev.start, seg.end, prev.done + seg.done)
            else:
                out.append(seg)
        self.segments = out

    @property
    def resumed_bytes(self) -> int:
        """Bytes already on disk from an earlier attempt."""
        return sum(s.done for s in self.segments)

    def plan(self, size: int | None, parts: int, min_part: int) -> list[Segment]:
        """Split the file into segments (kept as they are when resuming the same plan)."""
        if self.segments and self._planned_size() == size:
            return self.segments
        os.ftruncate(self.fd, 0)  # a new plan: nothing on disk is valid any more
        if size is None:
            self.segments = [Segment(0, None)]
        else:
            n = max(1, min(parts, size // max(min_part, 1), size // SEGMENT_ALIGN))
            # boundaries on SEGMENT_ALIGN, so that full chunks can be written O_DIRECT
            bounds = sorted({0, size, *(i * size // n // SEGMENT_ALIGN * SEGMENT_ALIGN
                                        for i in range(1, n))})
            self.segments = [Segment(a, b) for a, b in itertools.pairwise(bounds)] \
                or [Segment(0, 0)]
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
        if self._hasher is None:
            self._hasher = threading.Thread(target=self._hash_loop, name=f"hash-{self.ref[:16]}",
                                            daemon=True)
            self._hasher.start()

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
        fd = self.dfd if self.dfd >= 0 and _aligned(start, data) else self.fd
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
        pending = self._hash_inline(start, data)  # before the hash thread sees the write
        with self._cond:
            seg.done += len(data)
            self._since_checkpoint += len(data)
            self._cond.notify_all()
        return pending

    def _hash_inline(self, offset: int, data: memoryview) -> threading.Event | None:
        """Hash bytes straight from the receive buffer when they are next in order, so
        the hash thread does not read them back."""
        if self._hashed != offset or not self._hash_lock.acquire(blocking=False):
            return None
        pending = None
        try:
            if self._hashed == offset:
                self._b3.update(data)
                if self._sha is not None:
                    pending = self._sha.feed(data)
                with self._cond:
                    self._hashed += len(data)
                    self._cond.notify_all()
        finally:
            self._hash_lock.release()
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

    # --- hashing -------------------------------------------------------------------------

    def _contiguous(self) -> int:
        total = 0
        for s in self.segments:
            total = s.start + s.done
            if not s.complete:
                break
        return total

    def _finished(self) -> bool:
        return all(s.complete for s in self.segments) and self.segments[-1].end is not None

    def _hash_loop(self) -> None:
        # page-aligned buffers: bytes ahead of the frontier (a split stream's, written
        # O_DIRECT) are read back O_DIRECT too, without a copy through the page cache
        views = [memoryview(mmap.mmap(-1, HASH_CHUNK)), memoryview(mmap.mmap(-1, HASH_CHUNK))]
        pending: list[threading.Event | None] = [None, None]
        turn = 0
        rfd = _open_direct(self.data_path, os.O_RDONLY)
        try:
            while True:
                with self._cond:
                    while not self._closed and self._contiguous() <= self._hashed:
                        if self._finished():
                            return
                        self._cond.wait()
                    if self._closed:
                        return
                    target = self._contiguous()
                while self._hashed < target:
                    turn ^= 1
                    view = views[turn]
                    waiting = pending[turn]
                    if waiting is not None:
                        waiting.wait()  # the sha256 thread is done with this buffer
                    with self._hash_lock:
                        pos = self._hashed
                        if pos >= target:
                            break
                        n, rfd = self._read_back(rfd, view, pos, min(HASH_CHUNK, target - pos))
                        if n <= 0:
                            raise StoreError(
                                f"partial download {self.ref} is shorter than written")
                        self._b3.update(view[:n])
                        if self._sha is not None:
                            pending[turn] = self._sha.feed(view[:n])
                        with self._cond:
                            self._hashed = pos + n
                            self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self._hash_error = e
                self._cond.notify_all()
        finally:
            if rfd >= 0:
                os.close(rfd)

    def _read_back(self, rfd: int, view: memoryview, pos: int, want: int) -> tuple[int, int]:
        """Read ``want`` written bytes at ``pos`` into ``view``: O_DIRECT through ``rfd``
        where aligned (a whole number of blocks is read: the file is preallocated, and
        only ``want`` bytes are used), else through the page cache. Returns the count and
        the O_DIRECT descriptor (-1 once the file system refused it)."""
        if rfd >= 0 and pos % DIRECT_ALIGN == 0:
            try:
                n = os.preadv(rfd, [view[: -(-want // DIRECT_ALIGN) * DIRECT_ALIGN]], pos)
                return min(n, want), rfd
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(rfd)
                rfd = -1
        return os.preadv(self.fd, [view[:want]], pos), rfd

    def mark_complete(self) -> None:
        """Declare a stream of unknown size finished at what was written."""
        with self._cond:
            last = self.segments[-1]
            if last.end is None:
                last.end = last.start + last.done
            self._cond.notify_all()

    def _wait_hashed(self, size: int) -> None:
        self.start_hasher()
        with self._cond:
            while self._hashed < size and self._hash_error is None:
                self._cond.wait()
            if self._hash_error is not None:
                raise StoreError(f"hashing {self.ref} failed: {self._hash_error}") from (
                    self._hash_error
                )

    # --- finishing -----------------------------------------------------------------------

    def seal(self, expected_size: int | None, expected_sha256: str | None, *,
             expected_git_oid: str | None = None) -> Sealed:
        """fsync -> check size -> check digests. The bytes stay in the partial directory."""
        if not self._finished():
            raise StoreError(f"partial download {self.ref} is not complete")
        try:
            os.fsync(self.fd)
            size = os.fstat(self.fd).st_size
        except OSError as e:
            raise StoreError(f"cannot sync {self.ref}: {e.strerror}") from e
        written = self._contiguous()
        if size != written:
            os.ftruncate(self.fd, written)
            size = written
        if expected_size is not None and size != expected_size:
            raise IntegrityError(f"size mismatch: expected {expected_size} bytes, got {size}")
        self._wait_hashed(size)
        stated = self._sha.hexdigest() if self._sha is not None else None
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
        return Sealed(self.data_path, size, self._b3.hexdigest(), sha, oid)

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
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._sha is not None:
            self._sha.close()
        if self._hasher is not None:
            self._hasher.join()

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


def _open_direct(path: Path, mode: int = os.O_WRONLY) -> int:
    try:
        return os.open(path, mode | os.O_DIRECT)
    except OSError:
        return -1


def _aligned(offset: int, data: memoryview) -> bool:
    """Whether a write can go O_DIRECT: offset, length and buffer address aligned."""
    if offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not len(data):
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return False  # a read-only or non-contiguous buffer
    return address % DIRECT_ALIGN == 0


def _stated_pipe(identity: dict[str, Any]) -> ShaPipe | None:
    """The hasher of the digest the source stated: its sha256, else its git blob id (which
    needs the size up front), else none."""
    if identity.get("sha256"):
        return ShaPipe(hashlib.sha256())
    size = identity.get("size")
    if identity.get("git_oid") and isinstance(size, int):
        return ShaPipe(git_blob_hasher(size))
    return None


class BlobWriter:
    """A sequential writer for content that arrives in order (archive members, local
    copies): hashes straight from the caller's buffer, commits like :class:`Ingest`."""

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
