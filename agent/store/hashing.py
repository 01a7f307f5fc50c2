"""The hash pipeline of a partial download: blake3, and the digest the source stated, of the
file's bytes in order while they land out of order.

Hashing follows the contiguous written prefix (:class:`OrderedHash`): bytes that land next
in order are hashed straight from the receive buffer (:meth:`OrderedHash.inline`), the rest
is read back in order from the page cache (O_DIRECT where aligned) by one thread per
download, so the digest is ready when the last byte lands. The source's stated digest
(sha256, or a git blob's sha1) runs on a thread of its own (:class:`ShaPipe`), beside the
receiving thread's recv + blake3 + write instead of after them. After a restart the hasher
re-reads what is already on disk; nothing is fetched twice.

Everything here blocks; it runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from agent.store.direct import DIRECT_ALIGN, open_direct
from common.errors import StoreError

HASH_CHUNK = 4 * 1024 * 1024


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


def stated_pipe(identity: dict[str, Any]) -> ShaPipe | None:
    """The hasher of the digest the source stated: its sha256, else its git blob id (which
    needs the size up front), else none."""
    if identity.get("sha256"):
        return ShaPipe(hashlib.sha256())
    size = identity.get("size")
    if identity.get("git_oid") and isinstance(size, int):
        return ShaPipe(git_blob_hasher(size))
    return None


class OrderedHash:
    """The digests of one partial download, advanced in file order.

    ``cond`` is the download's condition: writers notify it when bytes land, and
    ``frontier()`` (the contiguous written prefix) and ``finished()`` are read under it.
    ``fd`` reads the data back through the page cache where O_DIRECT cannot."""

    def __init__(self, ref: str, data_path: Path, fd: int, cond: threading.Condition,
                 frontier: Callable[[], int], finished: Callable[[], bool],
                 identity: dict[str, Any]) -> None:
        self._ref = ref
        self._data_path = data_path
        self._fd = fd
        self._cond = cond
        self._frontier = frontier
        self._finished = finished
        self._b3 = blake3.blake3()
        self._sha = stated_pipe(identity)
        self._hashed = 0
        self._lock = threading.Lock()
        """Held by whoever advances the hashes (the hash thread or an in-order writer)."""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def start(self) -> None:
        """Start the ordered hash thread (once the segments are planned)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"hash-{self._ref[:16]}",
                                            daemon=True)
            self._thread.start()

    def inline(self, offset: int, data: memoryview) -> threading.Event | None:
        """Hash bytes straight from the receive buffer when they are next in order, so
        the hash thread does not read them back. Call before the write is visible to the
        hash thread. Returns an event to wait for before the buffer is reused (the stated
        digest's thread may still read it), or None."""
        if self._hashed != offset or not self._lock.acquire(blocking=False):
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
            self._lock.release()
        return pending

    def _loop(self) -> None:
        # page-aligned buffers: bytes ahead of the frontier (a split stream's, written
        # O_DIRECT) are read back O_DIRECT too, without a copy through the page cache
        views = [memoryview(mmap.mmap(-1, HASH_CHUNK)), memoryview(mmap.mmap(-1, HASH_CHUNK))]
        pending: list[threading.Event | None] = [None, None]
        turn = 0
        rfd = open_direct(self._data_path, os.O_RDONLY)
        try:
            while True:
                with self._cond:
                    while not self._closed and self._frontier() <= self._hashed:
                        if self._finished():
                            return
                        self._cond.wait()
                    if self._closed:
                        return
                    target = self._frontier()
                while self._hashed < target:
                    turn ^= 1
                    view = views[turn]
                    waiting = pending[turn]
                    if waiting is not None:
                        waiting.wait()  # the sha256 thread is done with this buffer
                    with self._lock:
                        pos = self._hashed
                        if pos >= target:
                            break
                        n, rfd = self._read_back(rfd, view, pos, min(HASH_CHUNK, target - pos))
                        if n <= 0:
                            raise StoreError(
                                f"partial download {self._ref} is shorter than written")
                        self._b3.update(view[:n])
                        if self._sha is not None:
                            pending[turn] = self._sha.feed(view[:n])
                        with self._cond:
                            self._hashed = pos + n
                            self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self._error = e
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
        return os.preadv(self._fd, [view[:want]], pos), rfd

    def wait(self, size: int) -> None:
        """Wait until the first ``size`` bytes are hashed (starting the thread if need be)."""
        self.start()
        with self._cond:
            while self._hashed < size and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise StoreError(f"hashing {self._ref} failed: {self._error}") from self._error

    def blake3(self) -> str:
        return self._b3.hexdigest()

    def stated(self) -> str | None:
        """The stated digest's hex (waits for its thread), or None if there is none."""
        return self._sha.hexdigest() if self._sha is not None else None

    def stop(self) -> None:
        """End both threads (what is not hashed yet stays unhashed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._sha is not None:
            self._sha.close()
        if self._thread is not None:
            self._thread.join()


__all__ = ["HASH_CHUNK", "OrderedHash", "ShaPipe", "git_blob_hasher", "stated_pipe"]
