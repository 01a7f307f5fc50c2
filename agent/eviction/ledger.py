"""The ledger of reserved space: what each running pull reserved, and what of it is not on
disk yet.

A pull reserves its declared size before it starts (:mod:`agent.eviction.reservations`).
What it has committed, found already stored, or allocated for its partial downloads is
counted in the filesystem's used bytes already, so only the rest is still *pending*: the
bytes eviction must leave room for besides what the disk holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from agent.eviction.limits import Disk, measure
from agent.index import Index
from agent.store.local import Store


class Ledger:
    """The reservations of the running pulls of one store."""

    def __init__(self, store: Store, index: Index) -> None:
        self.store = store
        self.index = index
        self.reserved: dict[str, int] = {}
        """Bytes reserved by each running pull (its declared size), by model key."""

    def total(self) -> int:
        """Bytes reserved by every running pull."""
        return sum(self.reserved.values())

    def _pulls(self) -> dict[str, tuple[int, list[str], list[str]]]:
        """Each running pull's reservation, committed blobs and partial downloads."""
        pulls = {}
        for key, nbytes in self.reserved.items():
            model = self.index.get(key)
            intent = model.intent if model is not None else None
            pulls[key] = (nbytes, list(intent.get("blobs", ())) if intent else [],
                          list(intent.get("refs", ())) if intent else [])
        return pulls

    def _pending(self, pulls: Iterable[tuple[int, list[str], list[str]]]) -> int:
        """Bytes running pulls reserved and do not hold on disk yet (blocking: a few stats).
        What a pull committed, found already stored, or allocated for its partial downloads
        is counted in the filesystem's used bytes already."""
        total = 0
        for nbytes, blobs, refs in pulls:
            held = 0
            for digest in set(blobs):
                info = self.store.blobs.info(digest)
                held += info.size if info is not None else 0
            for ref in refs:
                held += self.store.partial_allocated(ref)
            total += max(0, nbytes - held)
        return total

    async def look(self, key: str = "") -> tuple[Disk, int, int]:
        """The filesystem and the cache, what running pulls still need, and what the pull
        of ``key`` still needs."""
        pulls = self._pulls()
        own = [pulls[key]] if key in pulls else []
        return await asyncio.to_thread(
            lambda: (measure(self.store), self._pending(pulls.values()), self._pending(own)))


__all__ = ["Ledger"]
