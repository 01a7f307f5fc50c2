"""The control-plane client every source uses: retries, backoff, egress checks."""

from __future__ import annotations

import json

import pytest

from agent.egress import Egress
from agent.settings import EgressSettings
from agent.sources.control import Control
from common.errors import NotAllowed, SourceError, SourceNotFound, TransientError
from tests.servers.faulty import Fault, FaultyServer


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
