"""The limits eviction keeps the store under, and the choice of victims to meet them.

Pure functions over one measurement of the store's filesystem (:func:`measure`, the only
blocking one): what must be freed to meet each limit (:func:`shortfall`), and which models
to evict, least recently used first, to free it (:func:`plan`).
``agent.eviction.evictor`` acts on them.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from agent.settings import StoreSettings
from agent.store.local import Store
from agent.store.trees import FileEntry
from common.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    """The store's limits (``StoreSettings``), changeable at run time."""

    high: float
    low: float
    quota_bytes: int | None
    min_free_inodes: float

    @classmethod
    def of(cls, s: StoreSettings) -> Limits:
        return cls(s.high_watermark, s.low_watermark, s.quota_bytes, s.min_free_inodes)

    def check(self) -> None:
        if not 0 < self.low < self.high <= 1:
            raise InvalidInput(f"watermarks must satisfy 0 < low < high <= 1 "
                               f"(low {self.low}, high {self.high})")
        if self.quota_bytes is not None and self.quota_bytes <= 0:
            raise InvalidInput(f"the cache quota must be positive, not {self.quota_bytes}")
        if not 0 <= self.min_free_inodes < 1:
            raise InvalidInput(f"the inode floor must be in [0, 1), not {self.min_free_inodes}")


@dataclass(frozen=True)
class Disk:
    """One look at the store's filesystem and at the cache."""

    capacity: int
    used: int
    free: int
    """Bytes available to the agent (``f_bavail``)."""
    cache: int
    """Bytes of distinct blobs."""
    inodes: int
    inodes_free: int
    block: int


@dataclass(frozen=True)
class Shortfall:
    """What must be freed to meet each limit (zero or less: met)."""

    watermark: int = 0
    quota: int = 0
    inodes: int = 0
    space: int = 0
    """Bytes that must become physically free (out of space mid-write)."""

    def __bool__(self) -> bool:
        return max(self.watermark, self.quota, self.inodes, self.space) > 0

    def reason(self) -> str:
        """The limit to name as the reason of the next eviction."""
        for name in ("space", "watermark", "quota", "inodes"):
            if getattr(self, name) > 0:
                return "no_space" if name == "space" else name
        return "watermark"

    def minus(self, nbytes: int, blocks: int, inodes: int) -> Shortfall:
        return Shortfall(self.watermark - blocks, self.quota - nbytes, self.inodes - inodes,
                         self.space - blocks)


def measure(store: Store) -> Disk:
    """Look at the store's filesystem and cache (blocking: a ``statvfs``)."""
    st = os.statvfs(store.root)
    return Disk(
        capacity=st.f_blocks * st.f_frsize,
        used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        free=st.f_bavail * st.f_frsize,
        cache=store.cache_bytes(),
        inodes=st.f_files,
        inodes_free=st.f_favail,
        block=st.f_frsize or 4096,
    )


def shortfall(limits: Limits, disk: Disk, extra: int, level: float, space: int = 0
              ) -> Shortfall:
    """What must be freed for ``extra`` more bytes to fit under ``level`` (a fraction of
    the filesystem), the quota and the inode floor; and, with ``space``, for that many
    bytes to be physically free."""
    quota = disk.cache + extra - limits.quota_bytes if limits.quota_bytes is not None else 0
    floor = math.ceil(limits.min_free_inodes * disk.inodes)
    return Shortfall(
        watermark=disk.used + extra - int(level * disk.capacity),
        quota=quota,
        inodes=floor - disk.inodes_free if disk.inodes else 0,
        space=space - disk.free if space else 0,
    )


def plan(order: Sequence[tuple[str, Sequence[FileEntry]]], refs: Counter[str],
         need: Shortfall, block: int) -> tuple[list[tuple[str, str]], Shortfall, int]:
    """Choose victims from ``order`` (least recently used first) until ``need`` is met.

    ``refs`` counts the links of every blob from every current tree, plus one for each blob
    a running pull needs; it is updated as victims are chosen. Returns the victims with the
    reason of each, what is still short (nothing, unless every candidate was taken), and the
    bytes the victims free.
    """
    victims: list[tuple[str, str]] = []
    freed = 0
    for key, files in order:
        if not need:
            break
        nbytes = blocks = blobs = 0
        for f in files:
            left = refs[f.blake3] - 1
            refs[f.blake3] = left
            if left == 0:
                nbytes += f.size
                blocks += -(-f.size // block) * block
                blobs += 1
        victims.append((key, need.reason()))
        need = need.minus(nbytes, blocks, blobs + 2)  # + its tree directory and manifest
        freed += nbytes
    return victims, need, freed
