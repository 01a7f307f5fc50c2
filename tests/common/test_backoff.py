"""The one backoff of every retry loop (control requests, segments, informers, node labels,
status conflicts, CachedModel pulls, the webhook's namespace watch): full jitter over a
doubling window, after the wait the server asked for."""

from __future__ import annotations

import random
import statistics

from hypothesis import given
from hypothesis import strategies as st

from common import backoff
from common.backoff import SERVER_WAIT_MAX, Backoff
from common.errors import KubeError, TransientError

bases = st.floats(0.001, 60)
caps = st.floats(0.001, 3600)


@given(attempt=st.integers(0, 10_000), base=bases, cap=caps,
       retry_after=st.none() | st.floats(0, 10_000), seed=st.integers(0, 2**32))
def test_never_before_the_servers_wait_and_jitter_never_past_the_window(
    attempt: int, base: float, cap: float, retry_after: float | None, seed: int
) -> None:
    """A server's wait is honoured (a Hugging Face rate-limit window resets after up to 5
    minutes: retrying sooner only spends the attempts), up to SERVER_WAIT_MAX; our own
    jitter on top stays inside the window, which doubles per attempt up to the cap."""
    delay = backoff.delay(attempt, base, cap, retry_after, random.Random(seed))
    asked = 0.0 if retry_after is None else min(retry_after, SERVER_WAIT_MAX)
    window = min(cap, base * 2 ** min(attempt, 64))
    assert asked <= delay <= asked + window


@given(attempt=st.integers(0, 12), base=bases, cap=caps)
def test_full_jitter_uses_the_whole_window(attempt: int, base: float, cap: float) -> None:
    """Full jitter, not equal jitter: draws reach the bottom of the window as well as its top
    (equal jitter never goes below half), and average half of it."""
    rng = random.Random(attempt)
    window = min(cap, base * 2**attempt)
    draws = [backoff.delay(attempt, base, cap, rng=rng) for _ in range(400)]
    assert min(draws) < 0.1 * window and max(draws) > 0.9 * window
    assert abs(statistics.fmean(draws) - window / 2) < 0.1 * window


def test_nodes_told_the_same_retry_after_spread_out() -> None:
    rng = random.Random(7)
    delays = [backoff.delay(2, 0.5, 30.0, 1.0, rng) for _ in range(200)]
    assert min(delays) >= 1.0
    assert max(delays) - min(delays) > 1.0, "jitter spreads the herd beyond Retry-After"


@given(base=bases, cap=caps, failures=st.integers(1, 80), seed=st.integers(0, 2**32))
def test_a_loop_doubles_from_base_to_cap_and_starts_again_after_a_success(
    base: float, cap: float, failures: int, seed: int
) -> None:
    loop = Backoff(base, cap, random.Random(seed))
    for n in range(failures):
        assert loop.failures == n
        assert 0 <= loop.next() <= min(cap, base * 2 ** min(n, 64))
    loop.reset()
    assert loop.failures == 0 and loop.next() <= min(cap, base)


def test_a_loop_waits_what_a_transient_error_asks_and_only_that() -> None:
    loop = Backoff(0.01, 0.05, random.Random(1))
    assert 5.0 <= loop.next(TransientError("429", retry_after=5.0)) <= 5.01
    assert loop.next(TransientError("reset")) <= 0.02
    assert loop.next(KubeError("forbidden")) <= 0.04
    assert SERVER_WAIT_MAX <= loop.next(TransientError("hub", retry_after=10**6)) <= \
        SERVER_WAIT_MAX + 0.05


async def test_wait_sleeps_the_drawn_delay() -> None:
    loop = Backoff(0.001, 0.002)
    await loop.wait()
    assert loop.failures == 1
