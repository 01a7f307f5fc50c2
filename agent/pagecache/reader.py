"""The reads of one warming: files in order, in large sequential chunks, at a bounded
rate, skipping chunks already in the page cache, stopping at the memory floor or the
budget, or when asked to.

Plain ``pread`` into one reused buffer: unlike ``posix_fadvise(WILLNEED)``, which only
queues I/O, a read returns when its pages are in the cache, so the rate, the budget and
the memory floor are measured on what really happened. ``POSIX_FADV_SEQUENTIAL`` widens
the kernel's readahead behind each read (what it brings in is counted too, from
``mincore``), until the warming comes near a limit.

Blocking: the whole module runs in one worker thread per warming.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.pagecache.memory import MemoryProbe
from agent.pagecache.resident import PAGE, Mapping

MEMORY, BUDGET, STOPPED = "memory", "budget", "stopped"
#: within this many bytes of a limit, the kernel's readahead (``read_ahead_kb``, doubled for
#: a sequential file, and the next window started early) is turned off for the file, so that
#: a warming stops at its limit rather than up to a few tens of MiB past it
NEAR_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    floor_bytes: int
    """Available memory that must remain: no chunk is read that would go below it."""
    budget_bytes: int
    """Most bytes this warming reads."""
    rate_bytes: int
    """Bytes per second at most (0: unbounded)."""
    chunk_bytes: int
    """Bytes per read (a multiple of the page size)."""


@dataclass
class Result:
    warmed_bytes: int = 0
    """Bytes this warming brought into the page cache (its reads, and the kernel's
    readahead behind them)."""
    resident_bytes: int = 0
    """Bytes that were in the page cache already."""
    stopped: str | None = None
    """Why it ended early (:data:`MEMORY`, :data:`BUDGET`, :data:`STOPPED`); None: every
    file is in the page cache now."""


class Reader:
    """One warming's reads, in the calling thread; ``stop`` ends it within one chunk.
    ``on_warmed(n)`` is told of every ``n`` bytes brought in."""

    def __init__(self, limits: Limits, probe: MemoryProbe, stop: threading.Event,
                 on_warmed: Callable[[int], None] = lambda n: None) -> None:
        self.limits = limits
        self.probe = probe
        self.stop = stop
        self.on_warmed = on_warmed
        self.result = Result()
        chunk = max(PAGE, limits.chunk_bytes - limits.chunk_bytes % PAGE)
        self._buffer = memoryview(bytearray(chunk))
        self._start = 0.0
        self._available_at_start = 0

    def run(self, paths: Sequence[Path]) -> Result:
        self._start = time.monotonic()
        self._available_at_start = self.probe.read().available
        for path in paths:
            if not self._file(path):
                break
        return self.result

    def _file(self, path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            exact = False
            chunk = len(self._buffer)
            with Mapping(fd, size) as pages:
                # what was resident before the first read: readahead behind our reads
                # makes later chunks resident, and that is this warming's doing
                before = [pages.resident(o, chunk) for o in range(0, size, chunk)]
                for i, offset in enumerate(range(0, size, chunk)):
                    length = min(chunk, size - offset)
                    self.result.resident_bytes += before[i]
                    if pages.resident(offset, length) < length:
                        more = length - before[i]
                        if not self._allowed(more):
                            return False
                        if not exact and self._left() < more + NEAR_LIMIT:
                            # close to a limit: no readahead past what is read from here
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                            exact = True
                        self._read(fd, offset, length)
                    self._warmed(length - before[i])
            return True
        finally:
            os.close(fd)

    def _left(self) -> int:
        """Bytes that may still be brought in before the budget or the memory floor."""
        # MemAvailable counts page cache as available, so what this warming has brought
        # in already is taken off what was available when it started
        available = min(self.probe.read().available,
                        self._available_at_start - self.result.warmed_bytes)
        return min(self.limits.budget_bytes - self.result.warmed_bytes,
                   available - self.limits.floor_bytes)

    def _allowed(self, more: int) -> bool:
        """Whether ``more`` bytes may be read in: the stop flag, the budget and the
        memory floor."""
        if self.stop.is_set():
            self.result.stopped = STOPPED
            return False
        if self.result.warmed_bytes + more > self.limits.budget_bytes:
            self.result.stopped = BUDGET
            return False
        if self._left() < more:
            self.result.stopped = MEMORY
            return False
        return True

    def _read(self, fd: int, offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = os.preadv(fd, [self._buffer[done:length]], offset + done)
            if n == 0:  # the file shrank under us (it never should: blobs are read-only)
                break
            done += n

    def _warmed(self, n: int) -> None:
        if n > 0:
            self.result.warmed_bytes += n
            self.on_warmed(n)
            self._pace()

    def _pace(self) -> None:
        """Sleep (interruptibly) until the bytes read so far fit the rate."""
        rate = self.limits.rate_bytes
        if rate <= 0:
            return
        ahead = self.result.warmed_bytes / rate - (time.monotonic() - self._start)
        if ahead > 0:
            self.stop.wait(ahead)
