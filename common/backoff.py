"""The one retry delay of every loop: exponential backoff with full jitter, after the wait the
server asked for.

Full jitter (a uniform draw over ``[0, min(cap, base * 2**attempt)]``, AWS's "Exponential
Backoff And Jitter") spreads a herd of clients best: a thousand agents that failed together
come back spread over the whole window, not bunched at its top half. When the server said
how long to wait (``Retry-After``, the reset of a ``RateLimit`` window), that wait comes first
and the jitter after it, so nodes told "55 s" together do not come back together either.

:func:`delay` is the rule; :class:`Backoff` counts the consecutive failures of one loop.
Each loop keeps its own ``base`` and ``cap``.
"""

from __future__ import annotations

import asyncio
import random

from common.errors import TransientError

#: the longest wait a server may ask for and get (``Retry-After``, a ``RateLimit`` window's
#: reset: Hugging Face's windows are 5 minutes); a longer ask is cut to this
SERVER_WAIT_MAX = 600.0


def delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
          rng: random.Random | None = None) -> float:
    """Seconds to wait after failure number ``attempt`` (0 for the first window of
    ``base``): full jitter over an exponential window of at most ``cap``; when the server
    said how long to wait, that wait (up to :data:`SERVER_WAIT_MAX`) comes first and the
    jitter after it. Retrying sooner than asked would only spend the attempts inside the
    window (``cap`` is our own patience, not the server's)."""
    window = min(cap, base * 2 ** min(attempt, 64))
    draw = (rng or random).uniform(0, window)
    if retry_after is None:
        return draw
    return min(max(retry_after, 0.0), SERVER_WAIT_MAX) + draw


class Backoff:
    """The delays of one retry loop: the first failure waits up to ``base``, each further
    one up to twice as long (at most ``cap``); a success starts again from ``base``."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap, self._rng = base, cap, rng
        #: consecutive failures since the last success
        self.failures = 0

    def next(self, error: BaseException | None = None) -> float:
        """Count a failure; the seconds to wait before the next attempt (after the wait the
        server asked for, if ``error`` is a :class:`TransientError` that carries one)."""
        asked = error.retry_after if isinstance(error, TransientError) else None
        seconds = delay(self.failures, self.base, self.cap, asked, self._rng)
        self.failures += 1
        return seconds

    async def wait(self, error: BaseException | None = None) -> None:
        """Count a failure and wait before the next attempt."""
        await asyncio.sleep(self.next(error))

    def reset(self) -> None:
        """A success: the next failure waits up to ``base`` again."""
        self.failures = 0
