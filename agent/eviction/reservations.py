"""Reservations: the space a pull holds while it runs, so that parallel pulls cannot
together overrun the disk (DESIGN.md, "Eviction").

Before a pull starts it reserves its declared size (:meth:`Reservations.reserve`): if that
does not fit under the high watermark and the quota with what running pulls still need,
the evictor makes room; a pull that would not fit even after evicting everything that may
go fails at once with the sizes in its error. Out of space in the middle of a write,
:meth:`Reservations.relieve` evicts and the puller tries once more; if the pull still fails
its partial downloads are removed. After a restart nothing is evicted until the models in
use are known again, so a pull that needs eviction waits for that (up to
:data:`IN_USE_WAIT_SECONDS`).

Decisions are taken under the evictor's lock (:attr:`Evictor.lock`), the same one its
sweeps take: admitting a pull and evicting never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from agent.eviction.evictor import Evictor, Relief
from agent.eviction.ledger import Ledger
from agent.eviction.limits import Disk, shortfall
from common.errors import NoSpace

IN_USE_WAIT_SECONDS = 120.0
"""How long a pull that needs eviction waits for in-use information after a restart."""


class Reservations:
    """The puller's :class:`~agent.pull.puller.Reserver`: admits pulls into the space the
    limits leave (``ledger`` records what each holds), making room with ``evictor``."""

    def __init__(self, evictor: Evictor, ledger: Ledger) -> None:
        self.evictor = evictor
        self.ledger = ledger
        self._relieved: dict[str, int] = {}
        """Bytes eviction freed for a pull that ran out of space mid-write, by model key."""

    def reserved_bytes(self) -> int:
        """Bytes reserved by every running pull."""
        return self.ledger.total()

    @contextlib.asynccontextmanager
    async def reserve(self, key: str, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` for the pull of ``key`` while it runs, evicting to make room.

        Raises :class:`NoSpace` naming the sizes if the pull cannot fit even after eviction.
        If the pull fails out of space, its partial downloads are removed.
        """
        await self.evictor.settled(key)  # its old trees must be gone before it publishes
        await self._admit(key, nbytes)
        try:
            yield
        except NoSpace as e:
            await self.evictor.discard_partials(key)
            freed = self._relieved.get(key)
            if freed is None:
                raise
            disk, pending, _ = await self.ledger.look()
            raise NoSpace(
                f"model {key} ran out of space again after eviction freed {freed} bytes "
                f"({disk.free} bytes free now, {pending} still needed by running pulls): "
                f"{e}") from e
        finally:
            self.ledger.reserved.pop(key, None)
            self._relieved.pop(key, None)

    async def _admit(self, key: str, nbytes: int) -> None:
        evictor = self.evictor
        while True:
            async with evictor.lock:
                limits = evictor.limits
                disk, pending, _ = await self.ledger.look()
                short = shortfall(limits, disk, pending + nbytes, limits.high)
                if short and evictor.in_use_known.is_set():
                    relief = await evictor.free(pending + nbytes, limits.high, strict=True)
                    if relief.short:
                        disk, pending, _ = await self.ledger.look()
                        raise NoSpace(self._explain(key, nbytes, disk, relief, pending))
                    short = relief.short
                if not short:
                    self.ledger.reserved[key] = nbytes
                    return
            try:
                await asyncio.wait_for(evictor.in_use_known.wait(), IN_USE_WAIT_SECONDS)
            except TimeoutError:
                raise NoSpace(
                    f"model {key} needs {nbytes} bytes that do not fit without eviction, and "
                    "nothing is evicted until the models in use are known again after the "
                    "restart") from None

    async def relieve(self, key: str, error: NoSpace) -> None:
        """Out of space mid-write: evict what may be evicted so that the pull of ``key`` can
        try once more. Raises :class:`NoSpace` if no room can be made."""
        evictor = self.evictor
        if not evictor.in_use_known.is_set():
            raise NoSpace(f"{error} (nothing is evicted until the models in use are known "
                          "again after the restart)")
        async with evictor.lock:
            await evictor.discard_partials(None, quiet=True)
            _, pending, own = await self.ledger.look(key)
            # Room on the disk itself (not under the watermark: what filled it may not be
            # ours) for what running pulls still need; then, if models may go, as much
            # again for this pull, whose declared size can be short of what it writes (an
            # archive is unpacked next to itself).
            relief = await evictor.free(pending, 1.0, space=pending, reason="no_space",
                                        strict=True)
            if relief.short:
                disk, pending, _ = await self.ledger.look(key)
                raise NoSpace(
                    f"model {key} ran out of space while writing ({error}); {disk.free} bytes "
                    f"are free, running pulls still need {pending}, and evicting every model "
                    "that is not in use, pinned or being pulled would free only "
                    f"{relief.evictable}")
            need = pending + own
            more = await evictor.free(need, 1.0, space=need, reason="no_space", strict=False)
            freed = relief.freed + more.freed
            if not freed and more.short:
                disk, _, _ = await self.ledger.look(key)
                raise NoSpace(
                    f"model {key} ran out of space while writing ({error}); {disk.free} bytes "
                    f"are free, about {need} are needed to try again, and nothing may be "
                    "evicted (every model is in use, pinned or being pulled)")
            self._relieved[key] = freed

    def _explain(self, key: str, nbytes: int, disk: Disk, relief: Relief, pending: int) -> str:
        lim = self.evictor.limits
        why = relief.short.reason()
        if why == "quota" and lim.quota_bytes is not None:
            room = (f"the cache quota of {lim.quota_bytes} bytes has "
                    f"{max(0, lim.quota_bytes - disk.cache)} left")
        elif why == "inodes":
            room = (f"the store's filesystem has {disk.inodes_free} of {disk.inodes} inodes "
                    f"free, under its floor of {lim.min_free_inodes:.0%}")
        else:
            below = max(0, int(lim.high * disk.capacity) - disk.used)
            room = (f"the store's filesystem has {below} bytes free below its high watermark "
                    f"({lim.high:.0%} of {disk.capacity}; {disk.free} free in all)")
        return (f"no room for model {key}: it needs {nbytes} bytes, {room}, running pulls have "
                f"reserved {pending} more, and evicting every model that is not in use, "
                f"pinned or being pulled would free {relief.evictable}")


__all__ = ["IN_USE_WAIT_SECONDS", "Reservations"]
