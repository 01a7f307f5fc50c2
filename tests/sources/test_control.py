"""The control-plane client every source uses: retries, backoff, egress checks."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.egress import Egress
from agent.settings import EgressSettings
from agent.sources.control import SERVER_WAIT_MAX, Control, backoff_delay
from common.errors import NotAllowed, SourceError, SourceNotFound, TransientError
from tests.servers.faulty import Fault, FaultyServer


@given(attempt=st.integers(1, 12), retry_after=st.none() | st.floats(0, 10_000),
       seed=st.integers(0, 2**32))
def test_backoff_never_before_the_servers_wait_and_jitter_never_past_the_cap(
    attempt: int, retry_after: float | None, seed: int
) -> None:
    """A server's wait is honoured (a Hugging Face rate-limit window resets after up to 5
    minutes: retrying sooner only spends the attempts), up to SERVER_WAIT_MAX; our own
    jitter on top stays under the cap."""
    delay = backoff_delay(attempt, 0.5, 30.0, retry_after, random.Random(seed))
    asked = 0.0 if retry_after is None else min(retry_after, SERVER_WAIT_MAX)
    assert asked <= delay <= asked + 30.0


def test_nodes_told_the_same_retry_after_spread_out() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(2, 0.5, 30.0, 1.0, rng) for _ in range(200)]
    assert min(delays) >= 1.0
    assert max(delays) - min(delays) > 1.0, "jitter spreads the herd beyond Retry-After"


async def test_storm_of_503_is_retried_then_404_is_not(faulty: FaultyServer) -> None:
    faulty.add("/x.json", b"{}")
    faulty.fault("/x.json", Fault(status=503, retry_after=0), times=3)
    control = Control(Egress(EgressSettings(allow_hosts=("127.0.0.1",))), backoff_base=0.01)
    try:
        reply = await control.json(faulty.url("/x.json"))
        assert reply.json() == {}
        assert [r.status for r in faulty.log("/x.json")] == [503, 503, 503, 200]
        with pytest.raises(SourceNotFound):
            await control.json(faulty.url("/missing"))
        assert len(faulty.log("/missing")) == 1
        faulty.always("/x.json", Fault(status=503))
        with pytest.raises(TransientError, match="after 6 attempts"):
            await control.json(faulty.url("/x.json"))
    finally:
        await control.close()


async def test_loopback_refused_unless_allowed(faulty: FaultyServer) -> None:
    faulty.add("/x.json", b"{}")
    control = Control(Egress(EgressSettings()))
    try:
        with pytest.raises(NotAllowed, match="loopback"):
            await control.json(faulty.url("/x.json"))
        assert not faulty.log()
    finally:
        await control.close()


async def test_a_large_body_is_read_whole_and_capped(faulty: FaultyServer) -> None:
    """``read(n)`` returns what has arrived: a listing bigger than one TCP read must not
    be cut short."""
    big = json.dumps([{"path": f"f{i}", "size": i} for i in range(60_000)]).encode()
    faulty.add("/big.json", big)
    faulty.always("/big.json", Fault(rate=16 * 1024 * 1024))
    control = Control(Egress(EgressSettings(allow_hosts=("127.0.0.1",))))
    try:
        reply = await control.json(faulty.url("/big.json"))
        assert reply.body == big
        with pytest.raises(SourceError, match=f"more than {len(big) - 1} bytes"):
            await control.request("GET", faulty.url("/big.json"), max_body=len(big) - 1)
    finally:
        await control.close()
