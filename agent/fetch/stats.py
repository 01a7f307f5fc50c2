"""What a pull cost at the source: the counters the fetch engine fills in for its caller.

One :class:`FetchStats` per pull, shared by the files it fetches: bytes received (counted
from the worker threads, under a lock), files downloaded or found already stored, and how
many streams each file was fetched over (the splitter's steps).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

ProgressFn = Callable[[int], None]


@dataclass
class FetchStats:
    """What one pull cost at the source."""

    on_download: Callable[[int], None] | None = None
    """Called (from worker threads) with every chunk of bytes received from a source."""
    bytes_downloaded: int = 0
    files_downloaded: int = 0
    files_deduplicated: int = 0
    bytes_deduplicated: int = 0
    streams: dict[str, list[int]] = field(default_factory=dict)
    """By file path: the streams its download started with, then the number after each
    split (``[1, 2, 4, 8]``: doubled three times; ``[1]``: never split). Written on the
    event loop."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_downloaded += n
        if self.on_download is not None:
            self.on_download(n)


__all__ = ["FetchStats", "ProgressFn"]
